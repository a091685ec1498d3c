"""complex (ComplexFormer CMHA) and rcmha (RCMHA): references, degenerate cases, causality, bad configs."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.positional import (
    ComplexAttention,
    RelativeConvAttention,
    chunk_rcmha_attention,
    depthwise_conv1d,
    naive_complex_attention,
    naive_rcmha_attention,
    polar,
)
from headwise.variants.mha import MultiHeadAttention

DIM, HEADS = 48, 4  # head_dim 12


def _x(B=2, N=63, dim=DIM, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, dim, generator=g, dtype=dtype).requires_grad_(True)


def _grads(module, x, y):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    return torch.autograd.grad(y, [x, *module.parameters()], g)


def _assert_same_forward_backward(module, x, atol=1e-10):
    y_fast, y_naive = module(x), module.naive_forward(x)
    torch.testing.assert_close(y_fast, y_naive, atol=atol, rtol=0)
    for a, b in zip(_grads(module, x, y_fast), _grads(module, x, y_naive)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _randomize_(module, scale=0.3):
    """Move every parameter away from its (degenerate) initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


SPECS = ["complex", "rcmha", "rcmha(causal=True, kernel_size=4, max_distance=8)"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spec", SPECS)
def test_shape_and_dtype(spec, dtype):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=DIM, heads=HEADS).to(dtype)
    y = m(torch.randn(3, 17, DIM, dtype=dtype))
    assert y.shape == (3, 17, DIM) and y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_reach_every_parameter(spec):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=DIM, heads=HEADS).double()
    _randomize_(m)  # from the zero/identity init some gradients are structurally zero (e.g. u . k_j per row)
    m(_x()).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_under_seed(spec):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = headwise.create(spec, dim=DIM, heads=HEADS)
        outs.append(m(torch.randn(2, 20, DIM)))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


# ---- complex ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_complex_matches_polar_reference(N, causal):
    torch.manual_seed(0)
    m = ComplexAttention(DIM, HEADS, pattern=Causal() if causal else None).double()
    _randomize_(m)
    _assert_same_forward_backward(m, _x(N=N))


def test_complex_without_rotation_equals_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal(), backend="reference").double()
    m = ComplexAttention(DIM, HEADS, pattern=Causal()).double()
    m.load_state_dict(mha.state_dict(), strict=False)
    with torch.no_grad():
        m.freq.zero_()  # phase_scale = 1, phase_shift = 0 from the init: Adapt is the identity
    x = _x()
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


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


def test_polar_gradient_finite_at_zero():
    x = torch.tensor([[0.0, 1.0, 0.0, 2.0]], dtype=torch.float64, requires_grad=True)  # z_0 = 0, z_1 = 1 + 2i
    r, theta = polar(x)
    torch.testing.assert_close(r, torch.tensor([[0.0, 5**0.5]], dtype=torch.float64))
    (r.sum() + theta.sum()).backward()
    assert torch.isfinite(x.grad).all()


# ---- rcmha --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("causal,kernel_size", [(False, 3), (True, 4)], ids=["full-k3", "causal-k4"])
def test_rcmha_matches_naive(N, causal, kernel_size):
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, kernel_size=kernel_size, max_distance=5, causal=causal, chunk=16).double()
    _randomize_(m)
    _assert_same_forward_backward(m, _x(N=N))


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


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fresh_rcmha_equals_mha(causal):
    # identity convolution and zero relative terms: plain MHA
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal() if causal else None, backend="reference").double()
    m = RelativeConvAttention(DIM, HEADS, causal=causal).double()
    m.load_state_dict(mha.state_dict(), strict=False)
    x = _x()
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


def test_rcmha_causal_ignores_future_tokens():
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, causal=True, kernel_size=3, max_distance=4).double()
    _randomize_(m)
    x = _x(B=1, N=30).detach()
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x)[:, :20], m(x2)[:, :20], atol=1e-12, rtol=0)
    assert not torch.allclose(m(x)[:, 20:], m(x2)[:, 20:])


# ---- bad configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,kwargs,match", [
    ("complex", dict(dim=50, heads=4), "dim must be divisible by heads"),
    ("complex", dict(head_dim=7), "even head_dim"),
    ("complex", dict(rope_base=1), "rope_base"),
    ("rcmha", dict(dim=50, heads=4), "dim must be divisible by heads"),
    ("rcmha", dict(kernel_size=0), "kernel_size"),
    ("rcmha", dict(max_distance=-1), "max_distance"),
    ("rcmha", dict(chunk=0), "chunk"),
    ("rcmha", dict(causal="no"), "causal"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(spec, kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, **kw)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own note on its conv1d
@pytest.mark.parametrize("kernel_size", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["same", "causal"])
def test_depthwise_conv1d_equals_torch_conv1d(kernel_size, causal):
    torch.manual_seed(0)
    B, N, C = 2, 11, 5
    x = torch.randn(B, N, C, dtype=torch.float64)
    w, b = torch.randn(kernel_size, C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    xt = x.transpose(1, 2)  # (B, C, N)
    if causal:
        expected = torch.nn.functional.conv1d(torch.nn.functional.pad(xt, (kernel_size - 1, 0)), w.T[:, None], b,
                                              groups=C)
    else:
        expected = torch.nn.functional.conv1d(xt, w.T[:, None], b, padding="same", groups=C)
    torch.testing.assert_close(depthwise_conv1d(x, w, b, causal=causal), expected.transpose(1, 2), atol=1e-12, rtol=0)
