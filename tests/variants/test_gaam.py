"""GAAM and its dot-product plug-in against the literal product of Gaussian densities (float64)."""

import pytest
import torch

import headwise
from headwise.ops.gaussian import importance_factor, naive_gaussian_weights
from headwise.patterns import Causal
from headwise.variants.gaam import (
    GaussianAdaptiveAttention,
    GaussianDotProductAttention,
    naive_gaam_attention,
)
from headwise.variants.mha import MultiHeadAttention
from common import F64, assert_same_forward_and_grads


@pytest.mark.parametrize("axis", ["features", "tokens"])
def test_gaam_module_is_x_times_the_weights(axis):
    torch.manual_seed(0)
    m = GaussianAdaptiveAttention(24, 3, gaussians=3, axis=axis).to(F64)
    with torch.no_grad():
        m.gaussians.mean_offsets.normal_(0, 0.5), m.gaussians.scales.uniform_(0.6, 2.0)
    x = torch.randn(4, 13, 24, dtype=F64, requires_grad=True)
    xh = x.view(4, 13, 3, 8).transpose(1, 2)  # (B, H, N, d)
    w = naive_gaussian_weights(xh, m.gaussians.mean_offsets, m.gaussians.scales, -1 if axis == "features" else -2)
    ref = (xh * w).transpose(1, 2).reshape(4, 13, 24)
    assert_same_forward_and_grads(m(x), ref, [x, m.gaussians.mean_offsets, m.gaussians.scales],
                                  dict(rtol=1e-10, atol=1e-12), grad_tol=dict(rtol=1e-8, atol=1e-10))
    density = w.mean(0).transpose(0, 1).reshape(13, 24)
    torch.testing.assert_close(m.density, density.detach())
    torch.testing.assert_close(m.importance_factor, importance_factor(density.detach()))
    assert m.importance_factor.min() == 0 and m.importance_factor.max() == 1


@pytest.mark.parametrize("targets, axis, kv_heads, pattern", [
    ("qk", "features", None, Causal()), ("qkv", "tokens", 2, None), ("q", "features", 1, None),
], ids=["qk-features-causal", "qkv-tokens-gqa", "q-features-mqa"])
def test_gaam_attention_matches_naive(targets, axis, kv_heads, pattern):
    torch.manual_seed(0)
    m = GaussianDotProductAttention(32, 4, kv_heads=kv_heads, pattern=pattern, targets=targets, axis=axis,
                                    gaussians=2).to(F64)
    with torch.no_grad():
        for g in m.gaussians.values():
            g.mean_offsets.normal_(0, 0.5), g.scales.uniform_(0.6, 2.0)
    x = torch.randn(2, 19, 32, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_gaam_attention(m, x), [x, *m.parameters()], 1e-10,
                                  grad_tol=dict(rtol=1e-8, atol=1e-10))
    assert set(m.importance_factor) == set(targets)


def test_flat_gaussians_give_plain_attention():
    """Very wide Gaussians weight every feature 1/L; times L that is the identity: MultiHeadAttention."""
    torch.manual_seed(0)
    m = GaussianDotProductAttention(32, 4, kv_heads=2, pattern=Causal(), c_init=1e7).to(F64)
    mha = MultiHeadAttention(32, 4, kv_heads=2, pattern=Causal()).to(F64)
    mha.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("gaussians.")})
    x = torch.randn(2, 21, 32, dtype=F64)
    torch.testing.assert_close(m(x), mha(x), rtol=1e-9, atol=1e-9)


def test_causality_follows_the_axis():
    """Per-token normalisation is causal (gaam always, gaam_attention with causal=True); over the tokens it is not."""
    assert GaussianAdaptiveAttention(16, 2).caps.causal == "always"
    assert GaussianAdaptiveAttention(16, 2, axis="tokens").caps.causal == "none"
    assert GaussianDotProductAttention(16, 2).caps.causal == "optional"
    assert GaussianDotProductAttention(16, 2, axis="tokens").caps.causal == "none"
    with pytest.raises(ValueError, match="axis='tokens' normalises over the whole sequence"):
        GaussianDotProductAttention(16, 2, axis="tokens", causal=True)
    torch.manual_seed(0)
    m = GaussianAdaptiveAttention(16, 2, axis="tokens").to(F64)
    x = torch.randn(1, 9, 16, dtype=F64)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    assert (m(x2)[:, :5] - m(x)[:, :5]).abs().max() > 1e-6  # earlier outputs see later tokens


BAD = [
    ("gaam", dict(dim=30, heads=8), "divisible by heads"),
    ("gaam", dict(dim=64, heads=8, gaussians=0), "gaussians must be a positive int"),
    ("gaam", dict(dim=64, heads=8, axis="channels"), "axis must be one of"),
    ("gaam", dict(dim=64, heads=8, c_init=0.0), "c_init must be a positive"),
    ("gaam_attention", dict(dim=30, heads=8), "divisible by heads"),
    ("gaam_attention", dict(dim=64, heads=8, targets="qx"), "targets must be"),
    ("gaam_attention", dict(dim=64, heads=8, targets=""), "targets must be"),
    ("gaam_attention", dict(dim=64, heads=8, kv_heads=3), "multiple of kv_heads"),
]


@pytest.mark.parametrize("name, kw, match", BAD, ids=[f"{b[0]}-{b[2][:20]}" for b in BAD])
def test_bad_config_raises(name, kw, match):
    with pytest.raises(ValueError, match=match):
        headwise.create(name, **kw)
