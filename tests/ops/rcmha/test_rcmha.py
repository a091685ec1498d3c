"""RCMHA's relative attention on heads: the chunked SDPA path vs the materialized reference."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.rcmha import chunk_rcmha_attention, naive_rcmha_attention, relative_index
from common import ABS_TOL, assert_same_forward_and_grads


def _inputs(B, H, N, D, K, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    return r(B, H, N, D), r(B, H, N, D), r(B, H, N, D), r(H, D), r(2 * K + 1, H, D), r(2 * K + 1, H)


@pytest.mark.parametrize("B,H,N,D,K,chunk,causal", [(1, 1, 1, 4, 2, 512, False), (2, 3, 63, 8, 5, 16, True),
                                                   (1, 2, 500, 4, 7, 128, False)],
                         ids=["B1-H1-N1-D4", "B2-H3-N63-D8-causal-chunk16", "B1-H2-N500-D4-chunk128"])
def test_chunk_matches_naive_forward_and_gradients(B, H, N, D, K, chunk, causal):
    inputs = _inputs(B, H, N, D, K)
    out = chunk_rcmha_attention(*inputs, K, causal=causal, chunk=chunk)
    ref = naive_rcmha_attention(*inputs, K, causal=causal)
    assert_same_forward_and_grads(out, ref, inputs, ABS_TOL, seed=1)


def test_chunk_rcmha_independent_of_chunk():
    torch.manual_seed(0)
    B, H, N, D, K = 2, 3, 50, 8, 7
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    u, R, S = torch.randn(H, D), torch.randn(2 * K + 1, H, D), torch.randn(2 * K + 1, H)
    u, R, S = u.double(), R.double(), S.double()
    expected = naive_rcmha_attention(q, k, v, u, R, S, K, causal=True)
    for chunk in (1, 7, 50, 64):
        got = chunk_rcmha_attention(q, k, v, u, R, S, K, causal=True, chunk=chunk)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_relative_index_clips():
    idx = relative_index(torch.arange(5), torch.arange(5), max_distance=2)  # clamp(i - j, -2, 2) + 2
    assert idx.diagonal().eq(2).all() and idx[4, 0] == 4 and idx[0, 4] == 0 and idx[1, 0] == 3
