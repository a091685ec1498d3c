"""rcmha (RCMHA) module: its materialized reference, the depthwise convolution, degenerate cases, causality."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.mha import MultiHeadAttention
from headwise.variants.rcmha import RelativeConvAttention, depthwise_conv1d, naive_rcmha

DIM, HEADS = 48, 4  # head_dim 12


def _x(B=2, N=63, dim=DIM, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, dim, generator=g, dtype=dtype).requires_grad_(True)


def _grads(module, x, y):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    return torch.autograd.grad(y, [x, *module.parameters()], g)


def _assert_same_forward_backward(module, x, atol=1e-10):
    y_fast, y_naive = module(x), naive_rcmha(module, x)
    torch.testing.assert_close(y_fast, y_naive, atol=atol, rtol=0)
    for a, b in zip(_grads(module, x, y_fast), _grads(module, x, y_naive)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _randomize_(module, scale=0.3):
    """Move every parameter away from its (degenerate) initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


SPECS = ["rcmha", "rcmha(causal=True, kernel_size=4, max_distance=8)"]


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


@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("causal,kernel_size", [(False, 3), (True, 4), (False, 4)],
                         ids=["full-k3", "causal-k4", "full-k4"])
def test_rcmha_matches_naive(N, causal, kernel_size):
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, kernel_size=kernel_size, max_distance=5, causal=causal, chunk=16).double()
    _randomize_(m)
    _assert_same_forward_backward(m, _x(N=N))


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


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_weights_reproduce_the_forward(causal):
    """The matrix inspect records (the attention step on identity values), applied to the values, is the forward."""
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, causal=causal, max_distance=3, chunk=8).double()
    _randomize_(m)
    x = _x(N=19).detach()
    p = m.attention_weights(x)  # (B, H, N, N)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:3], dtype=p.dtype), atol=1e-12, rtol=0)
    if causal:
        assert (p.triu(1).abs() < 1e-300).all()
    _, _, v = m.project(x)
    torch.testing.assert_close(m.finish(p @ v), m(x), atol=1e-12, rtol=0)


def test_fused_kv_checkpoints_still_load():
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, max_distance=4).double()
    _randomize_(m)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith(("k_proj", "v_proj"))}
    old["kv_proj.weight"] = torch.cat([m.k_proj.weight, m.v_proj.weight]).detach()
    old["kv_proj.bias"] = torch.cat([m.k_proj.bias, m.v_proj.bias]).detach()
    fresh = RelativeConvAttention(DIM, HEADS, max_distance=4).double()
    fresh.load_state_dict(old)
    x = _x(N=9)
    torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=50, heads=4), "dim must be divisible by heads"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(max_distance=-1), "max_distance"),
    (dict(chunk=0), "chunk"),
    (dict(causal="no"), "causal"),
    (dict(kv_heads=2), "kv_heads"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("rcmha", **kw)


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
