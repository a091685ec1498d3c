"""lightning (TransNormerLLM on Lightning Attention-2): its equations, decoding by steps, its mixing matrix,
renamed keywords."""

from __future__ import annotations

import math

import pytest
import torch

import headwise
from headwise.ops.linear import decay_rates, naive_linear_attention
from headwise.variants.lightning import LightningAttention, naive_lightning
from common import assert_decoding_equals_forward, assert_same_forward_and_grads, build, rand


DECODERS = {
    "lightning-decay": "lightning(layer=2, num_layers=6)",
    "lightning-no-decay": "lightning(decay=False)",
    "lightning-head-dim-12": "lightning(head_dim=12, chunk=8)",
}


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("N,M", [(1, 5), (37, 9), (130, 3)], ids=lambda x: str(x))
def test_prefill_then_steps_equals_forward(name, N, M):
    m = build(DECODERS[name], dim=32, heads=4)
    assert_decoding_equals_forward(m, rand(2, N + M, 32), [("prefill", N), ("step", M)])


def test_steps_from_scratch_and_chunked_prefill():
    m = build(DECODERS["lightning-decay"], dim=32, heads=4)
    assert_decoding_equals_forward(m, rand(1, 40, 32, seed=1), [("step", 5), ("prefill", 16), ("prefill", 19)])


@pytest.mark.parametrize("spec,N", [("lightning(layer=1, num_layers=4)", 50), ("lightning(decay=False, chunk=5)", 63),
                                    ("lightning(head_dim=12, qkv_bias=True, out_bias=True)", 1)],
                         ids=["decay-N50", "no-decay-N63", "head-dim-bias-N1"])
def test_lightning_equals_its_equations(spec, N):
    """Y = (SRMSNorm([O_1..O_H]) * U) W_O, O_h = ((Q K^T) * M) V, Q = silu(X W_Q), K = silu(X W_K), V = X W_V
    (naive_lightning), forward and gradients."""
    m = build(spec, dim=24, heads=3)
    x = rand(2, N, 24, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_lightning(m, x), [x, *m.parameters()], seed=1)


def test_no_biases_by_default():
    m = headwise.create("lightning", dim=24, heads=3)
    assert m.qkvu_proj.bias is None and m.out_proj.bias is None


@pytest.mark.parametrize("N", [1, 63, 500])
def test_chunk_is_speed_only(N):
    """The Lightning Attention-2 tile changes nothing but speed: same weights, same output and gradients."""
    a = build("lightning(layer=1, num_layers=3, chunk=7)", dim=16, heads=2)
    b = build("lightning(layer=1, num_layers=3, chunk=64)", dim=16, heads=2)
    b.load_state_dict(a.state_dict())
    x = rand(1, N, 16, requires_grad=True)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(ya.sum(), [x, *a.parameters()])
    gb = torch.autograd.grad(yb.sum(), [x, *b.parameters()])
    for u, w in zip(ga, gb):
        torch.testing.assert_close(u, w, rtol=1e-10, atol=1e-10)


def test_attention_weights_are_the_mixing_matrix():
    """``attention_weights`` is ``(Q K^T) * M``: lower triangular, and applied to V it gives the head outputs."""
    m = build("lightning(layer=1, num_layers=3)", dim=32, heads=4).eval()
    x = rand(2, 9, 32)
    with torch.no_grad():
        w = m.attention_weights(x)
        q, k, v, _ = m.features(x)
    assert w.shape == (2, 4, 9, 9) and torch.all(w.triu(1) == 0)
    torch.testing.assert_close(w @ v, naive_linear_attention(q, k, v, m.decay)[0], rtol=1e-10, atol=1e-10)


def test_capabilities():
    caps = headwise.create("lightning", dim=16, heads=2).caps
    assert (caps.causal, caps.decode, caps.weights, caps.grid) == ("always", True, "scores", "none")


def test_old_keywords_still_work_and_warn():
    with pytest.warns(FutureWarning, match="block_size= is renamed chunk="):
        m = headwise.create("lightning(block_size=16)", dim=16, heads=2)
    assert m.config.chunk == 16
    with pytest.warns(FutureWarning, match="bias= is renamed qkv_bias= and out_bias="):
        m = LightningAttention(16, 2, bias=True)
    assert m.config.qkv_bias and m.config.out_bias
    assert m.qkvu_proj.bias is not None and m.out_proj.bias is not None


@pytest.mark.parametrize("spec,match", [
    ("lightning(layer=4, num_layers=4)", r"0 <= layer < num_layers, got layer=4 num_layers=4"),
    ("lightning(chunk=0)", r"chunk must be a positive int, got chunk=0"),
    ("lightning(decay=1)", r"decay must be a bool"),
])
def test_bad_configs(spec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, dim=32, heads=4)


def test_bad_calls():
    light = build("lightning", dim=16, heads=2)
    x = rand(1, 12, 16)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\] with C = dim = 16"):
        light(rand(1, 5, 8))
    with pytest.raises(ValueError, match=r"x_t must be \[B, C\]"):
        light.step(x)


def test_registered_and_created():
    assert "lightning" in headwise.available()
    assert isinstance(headwise.create("lightning", dim=64, heads=4), LightningAttention)
    light = headwise.create("lightning(layer=0, num_layers=3)", dim=64, heads=4)
    torch.testing.assert_close(light.decay, decay_rates(4, layer=0, num_layers=3))
    assert headwise.create("lightning(decay=False)", dim=64, heads=4).decay is None
    assert math.isclose(light.scale, 1.0) and not light.normalize
