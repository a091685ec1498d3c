"""The reference itself, against the definitions written as explicit sums over tokens."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.linear import naive_linear_attention
from headwise.ops.linear.base import NORMALIZER_EPS

F64 = torch.float64


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_naive_equals_explicit_sums(normalize):
    """o_i = s sum_{j<=i} lam^(i-j) (q_i.k_j) v_j + s lam^(i+1) q_i S0; S_end = sum_j lam^(N-1-j) k_j^T v_j + lam^N S0
    (normalized: the same with [v, 1], then divided by the last column + eps)."""
    g = torch.Generator().manual_seed(0)
    B, H, N, D, Dv, s = 2, 2, 7, 3, 4, 0.7
    q, k = (torch.rand(B, H, N, D, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(B, H, N, Dv, generator=g, dtype=F64)
    lam = torch.tensor([0.5, 0.9], dtype=F64)
    s0 = torch.rand(B, H, D, Dv + int(normalize), generator=g, dtype=F64)
    o, final = naive_linear_attention(q, k, v, lam, scale=s, normalize=normalize, initial_state=s0,
                                      output_final_state=True)
    vv = torch.cat([v, torch.ones(B, H, N, 1, dtype=F64)], -1) if normalize else v
    for b in range(B):
        for h in range(H):
            l = lam[h]
            for i in range(N):
                acc = s * l ** (i + 1) * q[b, h, i] @ s0[b, h]
                for j in range(i + 1):
                    acc = acc + s * l ** (i - j) * (q[b, h, i] @ k[b, h, j]) * vv[b, h, j]
                want = acc[:-1] / (acc[-1] + NORMALIZER_EPS) if normalize else acc
                torch.testing.assert_close(o[b, h, i], want, rtol=1e-12, atol=1e-12)
            state = l ** N * s0[b, h]
            for j in range(N):
                state = state + l ** (N - 1 - j) * torch.outer(k[b, h, j], vv[b, h, j])
            torch.testing.assert_close(final[b, h], state, rtol=1e-12, atol=1e-12)


def test_final_state_only_on_request():
    q = k = v = torch.randn(1, 1, 5, 2)
    assert naive_linear_attention(q, k, v)[1] is None
