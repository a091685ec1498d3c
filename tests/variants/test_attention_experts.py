"""attention_experts (BAM): reference, degenerate cases, upcycling, routing, checkpoints, bad configs."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal, PerHead
from headwise.variants.attention_experts import (
    AttentionExperts,
    naive_attention_experts,
    top_k_gates,
    upcycle_attention,
)
from headwise.variants.mha import MultiHeadAttention
from common import ABS_TOL, assert_loads_old_checkpoint, assert_same_forward_and_grads, rand

DIM, HEADS = 48, 4

@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("share_kv", [False, True], ids=["own-kv", "shared-kv"])
@pytest.mark.parametrize("topk,causal", [(None, False), (2, True)], ids=["soft-full", "top2-causal"])
def test_attention_experts_matches_naive(N, share_kv, topk, causal):
    torch.manual_seed(0)
    m = AttentionExperts(DIM, HEADS, experts=3, share_kv=share_kv, topk=topk,
                         pattern=Causal() if causal else None).double()
    x = rand(2, N, DIM, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_attention_experts(m, x), [x, *m.parameters()], ABS_TOL, seed=1)


def test_causal_field_is_the_causal_pattern():
    torch.manual_seed(0)
    m = AttentionExperts(DIM, HEADS, experts=2, causal=True).double()
    by_pattern = AttentionExperts(DIM, HEADS, experts=2, pattern=Causal()).double()
    by_pattern.load_state_dict(m.state_dict())
    x = rand(2, 20, DIM)
    torch.testing.assert_close(m(x), by_pattern(x), atol=0, rtol=0)
    torch.testing.assert_close(m(x), naive_attention_experts(m, x), atol=1e-10, rtol=0)


def test_one_expert_equals_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal()).double()
    moa = upcycle_attention([mha])
    x = rand(2, 63, DIM)
    torch.testing.assert_close(moa(x), mha(x), atol=1e-12, rtol=0)
    # the registered constructor with experts=1 and the same weights, against the reference backend
    m = AttentionExperts(DIM, HEADS, experts=1, pattern=Causal(), backend="reference").double()
    m.load_state_dict(moa.state_dict())
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


def test_upcycle_keeps_the_causal_mode():
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, causal=True).double()
    moa = upcycle_attention([mha])
    assert moa.config.causal
    x = rand(2, 20, DIM)
    torch.testing.assert_close(moa(x), mha(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("share_kv", [False, True], ids=["own-kv", "shared-kv"])
def test_upcycle_mixes_the_dense_layers(share_kv):
    torch.manual_seed(0)
    layers = [MultiHeadAttention(DIM, HEADS).double() for _ in range(3)]
    moa = upcycle_attention(layers, share_kv=share_kv)
    assert moa.config.experts == 3 and moa.config.share_kv == share_kv and moa.q_weight.dtype == torch.float64
    x = rand(2, 20, DIM)
    gates = moa.route(x)  # (B, N, E)
    if share_kv:  # each expert's k, v are the average of the layers'
        for name in ("k_proj", "v_proj"):
            w = torch.stack([getattr(m, name).weight for m in layers]).mean(0)
            b = torch.stack([getattr(m, name).bias for m in layers]).mean(0)
            for m in layers:
                getattr(m, name).weight.data.copy_(w)
                getattr(m, name).bias.data.copy_(b)
    expected = sum(gates[..., e : e + 1] * m(x) for e, m in enumerate(layers))
    torch.testing.assert_close(moa(x), expected, atol=1e-12, rtol=0)


def test_upcycle_rejects_bad_layers():
    mha = MultiHeadAttention(DIM, HEADS)
    with pytest.raises(ValueError, match="layers"):
        upcycle_attention([])
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        upcycle_attention([mha, torch.nn.Linear(DIM, DIM)])
    with pytest.raises(ValueError, match=r"layers\[1\].*heads"):
        upcycle_attention([mha, MultiHeadAttention(DIM, 2 * HEADS)])
    with pytest.raises(ValueError, match=r"layers\[1\].*causal"):
        upcycle_attention([mha, MultiHeadAttention(DIM, HEADS, causal=True)])
    with pytest.raises(ValueError, match="kv_heads"):
        upcycle_attention([MultiHeadAttention(DIM, HEADS, kv_heads=2)])


@pytest.mark.parametrize("share_kv", [False, True], ids=["own-kv", "shared-kv"])
def test_fused_kv_checkpoints_still_load(share_kv):
    """Checkpoints written with the former fused ``kv_weight`` / ``kv_bias`` (rows [:H*D] the keys) load."""
    torch.manual_seed(0)
    m = AttentionExperts(DIM, HEADS, experts=3, share_kv=share_kv).double()
    old = {k: v for k, v in m.state_dict().items() if not k.startswith(("k_", "v_"))}
    old["kv_weight"] = torch.cat([m.k_weight, m.v_weight], dim=-2).detach()
    old["kv_bias"] = torch.cat([m.k_bias, m.v_bias], dim=-1).detach()
    fresh = AttentionExperts(DIM, HEADS, experts=3, share_kv=share_kv).double()
    assert_loads_old_checkpoint(fresh, old, m, rand(2, 9, DIM))


def test_attention_experts_routing_invariants():
    torch.manual_seed(0)
    x = torch.randn(2, 30, DIM)
    soft = AttentionExperts(DIM, HEADS, experts=5)
    g = soft.route(x)
    assert g.shape == (2, 30, 5) and (g > 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(2, 30))
    top = AttentionExperts(DIM, HEADS, experts=5, topk=2)
    top.router.load_state_dict(soft.router.state_dict())
    gk = top.route(x)
    assert ((gk > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gk.sum(-1), torch.ones(2, 30))
    # the kept experts are the two most probable ones
    assert torch.equal((gk > 0), torch.zeros_like(g, dtype=torch.bool).scatter(-1, g.topk(2).indices, True))


def test_top_k_gates():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    torch.testing.assert_close(top_k_gates(p, 2), torch.tensor([[0.0, 4 / 3.5, 0.0, 3 / 3.5]]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=50, heads=4), "dim must be divisible by heads"),
    (dict(experts=0), "experts"),
    (dict(experts=2, topk=3), "topk must be at most experts=2"),
    (dict(share_kv="yes"), "share_kv"),
    (dict(causal=1), "causal"),
    (dict(backend="cuda"), "backend"),
    (dict(pattern=PerHead([Causal()] * 4)), "shared by all heads"),
    (dict(pattern=3), "pattern"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("attention_experts", **kw)


def test_bad_input_shape_raises():
    m = AttentionExperts(DIM, HEADS)
    with pytest.raises(ValueError, match="dim"):
        m(torch.randn(2, 5, DIM + 1))
