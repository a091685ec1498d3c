"""CMHA on heads: the rotation form (complex_attention) vs the polar-form reference; RoPE and MHA as special cases."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.ops.complex import complex_attention, naive_complex_attention, polar
from headwise.patterns import Causal
from common import ABS_TOL, assert_same_forward_and_grads


def _inputs(B, H, N, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    q, k, v = r(B, H, N, D), r(B, H, M, D), r(B, H, M, D + 1)
    noise = [0.3 * torch.randn(H, D // 2, generator=g, dtype=torch.float64) for _ in range(2)]
    phases = [1.0 + noise[0], noise[1], torch.rand(H, D // 2, generator=g, dtype=torch.float64)]  # alpha, beta, omega
    return q, k, v, [p.requires_grad_() for p in phases]


@pytest.mark.parametrize("B,H,N,M,D,pattern", [(1, 1, 1, 1, 2, None), (2, 3, 63, 63, 8, Causal()),
                                                (1, 2, 17, 40, 6, None)],
                         ids=["B1-H1-N1-D2", "B2-H3-N63-D8-causal", "B1-H2-N17-M40-D6"])
def test_rotation_form_matches_polar_reference(B, H, N, M, D, pattern):
    q, k, v, phases = _inputs(B, H, N, M, D)
    out = complex_attention(q, k, v, *phases, pattern)
    ref = naive_complex_attention(q, k, v, *phases, pattern)
    assert_same_forward_and_grads(out, ref, (q, k, v, *phases), ABS_TOL, seed=1)


def test_scale_and_backend_pass_through():
    q, k, v, phases = _inputs(1, 2, 9, 9, 4)
    ref = naive_complex_attention(q, k, v, *phases, scale=0.1)
    torch.testing.assert_close(complex_attention(q, k, v, *phases, scale=0.1, backend="reference"), ref, **ABS_TOL)


def test_complex_identity_adapt_is_rope():
    # alpha = 1, beta = 0: the rotation by freq * position is rotary position embedding (rotate-half layout)
    torch.manual_seed(0)
    B, H, N, D = 1, 2, 9, 8
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    freq = torch.rand(H, D // 2, dtype=torch.float64)
    ang = torch.arange(N, dtype=torch.float64)[:, None] * freq[:, None]  # (H, N, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (H, N, D)

    def rope(t):
        a, b = t.chunk(2, -1)
        return t * cos + torch.cat([-b, a], -1) * sin

    expected = headwise.attention(rope(q), rope(k), v, backend="reference")
    ones, zeros = torch.ones_like(freq), torch.zeros_like(freq)
    torch.testing.assert_close(naive_complex_attention(q, k, v, ones, zeros, freq), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(complex_attention(q, k, v, ones, zeros, freq), expected, atol=1e-12, rtol=0)


def test_polar_gradient_finite_at_zero():
    x = torch.tensor([[0.0, 1.0, 0.0, 2.0]], dtype=torch.float64, requires_grad=True)  # z_0 = 0, z_1 = 1 + 2i
    r, theta = polar(x)
    torch.testing.assert_close(r, torch.tensor([[0.0, 5**0.5]], dtype=torch.float64))
    (r.sum() + theta.sum()).backward()
    assert torch.isfinite(x.grad).all()
