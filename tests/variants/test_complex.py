"""complex (ComplexFormer CMHA) module: its polar-form reference, degenerate cases, causality, bad configs."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.complex import ComplexAttention, naive_complex
from headwise.variants.mha import MultiHeadAttention

DIM, HEADS = 48, 4  # head_dim 12


def _x(B=2, N=63, dim=DIM, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, dim, generator=g, dtype=dtype).requires_grad_(True)


def _grads(module, x, y):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    return torch.autograd.grad(y, [x, *module.parameters()], g)


def _assert_same_forward_backward(module, x, atol=1e-10):
    y_fast, y_naive = module(x), naive_complex(module, x)
    torch.testing.assert_close(y_fast, y_naive, atol=atol, rtol=0)
    for a, b in zip(_grads(module, x, y_fast), _grads(module, x, y_naive)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _randomize_(module, scale=0.3):
    """Move every parameter away from its (degenerate) initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


SPECS = ["complex", "complex(causal=True)"]


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
    _randomize_(m)  # from the init some gradients are structurally zero
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
@pytest.mark.parametrize("causal", ["none", "pattern", "field"])
def test_complex_matches_polar_reference(N, causal):
    torch.manual_seed(0)
    m = ComplexAttention(DIM, HEADS, pattern=Causal() if causal == "pattern" else None,
                         causal=causal == "field").double()
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


def test_fused_kv_checkpoints_still_load():
    torch.manual_seed(0)
    m = ComplexAttention(DIM, HEADS).double()
    _randomize_(m)
    old = {k: v for k, v in m.state_dict().items() if not k.startswith(("k_proj", "v_proj"))}
    old["kv_proj.weight"] = torch.cat([m.k_proj.weight, m.v_proj.weight]).detach()
    old["kv_proj.bias"] = torch.cat([m.k_proj.bias, m.v_proj.bias]).detach()
    fresh = ComplexAttention(DIM, HEADS).double()
    fresh.load_state_dict(old)
    x = _x(N=9)
    torch.testing.assert_close(fresh(x), m(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=50, heads=4), "dim must be divisible by heads"),
    (dict(head_dim=7), "even head_dim"),
    (dict(rope_base=1), "rope_base"),
    (dict(kv_heads=2), "kv_heads"),
    (dict(causal="no"), "causal"),
    (dict(backend="cuda"), "backend"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("complex", **kw)
