"""linear (kernelized linear attention): its equations, decoding by steps when causal, its attention weights,
renamed keywords and older checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.linear import LinearAttention, naive_linear
from common import (
    assert_decoding_equals_forward,
    assert_loads_old_checkpoint,
    assert_same_forward_and_grads,
    build,
    fused_checkpoint,
    rand,
)


DECODERS = {
    "linear-elu": "linear(causal=True)",
    "linear-relu": "linear(causal=True, feature_map='relu', chunk=16)",
}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("N,M", [(1, 5), (37, 9), (130, 3)], ids=lambda x: str(x))
def test_prefill_then_steps_equals_forward(name, N, M):
    m = build(DECODERS[name], dim=32, heads=4)
    assert_decoding_equals_forward(m, rand(2, N + M, 32), [("prefill", N), ("step", M)])


def test_steps_from_scratch_and_chunked_prefill():
    m = build(DECODERS["linear-elu"], dim=32, heads=4)
    assert_decoding_equals_forward(m, rand(1, 40, 32, seed=1), [("step", 5), ("prefill", 16), ("prefill", 19)])


def _featurized(m, x, phi):
    """phi(x W_Q + b), phi(x W_K + b), x W_V + b as heads [B, H, N, D], from the module's weights."""
    B, N, _ = x.shape
    H, D = m.config.heads, m.config.head_dim
    heads = lambda t: t.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    return (heads(phi(F.linear(x, m.q_proj.weight, m.q_proj.bias))), heads(phi(F.linear(x, m.k_proj.weight, m.k_proj.bias))),
            heads(F.linear(x, m.v_proj.weight, m.v_proj.bias)))


PHI = {"elu+1": lambda t: F.elu(t) + 1, "relu": F.relu}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("feature_map", ["elu+1", "relu"])
@pytest.mark.parametrize("N", [1, 45, 130])
def test_linear_equals_its_equations(causal, feature_map, N):
    """o_i = phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps), j over all or j <= i
    (naive_linear), forward and gradients."""
    m = build(f"linear(causal={causal}, feature_map={feature_map!r}, chunk=16)", dim=16, heads=2)
    x = rand(2, N, 16, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_linear(m, x), [x, *m.parameters()], seed=1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_weights_are_the_normalised_scores(causal):
    """A_ij = phi(q_i) . phi(k_j) / (sum_l phi(q_i) . phi(k_l) + eps) (l <= i when causal): A V is exactly the
    head output, and rows sum to S / (S + eps) with eps = 1e-6 (the module's normalizer guard)."""
    m = build(f"linear(causal={causal}, feature_map='relu')", dim=16, heads=2).eval()
    x = rand(2, 33, 16)
    with torch.no_grad():
        w = m.attention_weights(x)
    q, k, v = _featurized(m, x, F.relu)
    a = q @ k.transpose(-1, -2)
    if causal:
        a = a.tril()
    rows = a.sum(-1, keepdim=True)
    eps = 1e-6
    torch.testing.assert_close(w, a / (rows + eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.sum(-1, keepdim=True), rows / (rows + eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w @ v, m.attend(q, k, v), rtol=1e-10, atol=1e-10)


def test_non_causal_linear_has_no_steps():
    m = build("linear", dim=16, heads=2)
    with pytest.raises(ValueError, match=r"step\(\) decodes token by token and needs causal=True"):
        m.step(rand(1, 1, 16)[:, 0])
    with pytest.raises(ValueError, match=r"prefill\(\) .* needs causal=True"):
        m.prefill(rand(1, 4, 16))


def test_capabilities_follow_causal():
    assert not headwise.create("linear", dim=16, heads=2).caps.decode
    caps = headwise.create("linear(causal=True)", dim=16, heads=2).caps
    assert (caps.causal, caps.decode, caps.weights) == ("optional", True, "method")


def test_old_keyword_still_works_and_warns():
    with pytest.warns(FutureWarning, match="block_size= is renamed chunk="):
        m = headwise.create("linear(causal=True, block_size=16)", dim=16, heads=2)
    assert m.config.chunk == 16


def test_fused_qkv_checkpoint_loads():
    """Checkpoints from before the split projections (one ``qkv_proj``, rows [q; k; v]) load into q/k/v_proj."""
    m = build("linear(causal=True)", dim=16, heads=2)
    fresh = build("linear(causal=True)", seed=1, dim=16, heads=2)
    old = fused_checkpoint(m.state_dict(), ("q_proj", "k_proj", "v_proj"), "qkv_proj")
    assert_loads_old_checkpoint(fresh, old, m, rand(1, 11, 16))


@pytest.mark.parametrize("spec,match", [
    ("linear(feature_map='softmax')", r"unknown feature_map='softmax'; valid: 'elu\+1', 'relu'"),
    ("linear(heads=5)", r"dim must be divisible by heads"),
    ("linear(chunk=0)", r"chunk must be a positive int, got chunk=0"),
    ("linear(kv_heads=2)", r"kv_heads must equal heads, got kv_heads=2 heads=4"),
])
def test_bad_configs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, dim=32, heads=4)


def test_registered_and_created():
    assert "linear" in headwise.available()
    m = headwise.create("linear", dim=64, heads=4)
    assert isinstance(m, LinearAttention) and m.normalize and m.decay is None
