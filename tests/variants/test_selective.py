"""selective (Union of Experts SMHA): reference, degenerate cases, routing, causality, bad configs."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.mha import MultiHeadAttention
from common import ABS_TOL, assert_same_forward_and_grads, rand
from headwise.variants.selective import SelectiveAttention, naive_selective_attention

DIM, HEADS = 48, 4

@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("topk,expert_topk,causal,kv_heads", [(2, 4, False, None), (1, 3, True, None),
                                                             (3, 2, False, None), (2, 3, True, 2)],
                         ids=["k2-e4", "k1-e3-causal", "k3-e2", "k2-e3-causal-gqa"])
def test_selective_matches_naive(N, topk, expert_topk, causal, kv_heads):
    torch.manual_seed(0)
    m = SelectiveAttention(DIM, HEADS, kv_heads=kv_heads, topk=topk, expert_topk=expert_topk, causal=causal).double()
    x = rand(2, N, DIM, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_selective_attention(m, x), [x, *m.parameters()], ABS_TOL, seed=1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_selective_all_heads_uniform_router_equals_mha(causal, kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, kv_heads=kv_heads, pattern=Causal() if causal else None,
                             backend="reference").double()
    m = SelectiveAttention(DIM, HEADS, kv_heads=kv_heads, topk=HEADS, expert_topk=HEADS, causal=causal).double()
    m.load_state_dict(mha.state_dict(), strict=False)
    for router in (m.token_router, m.expert_router):
        torch.nn.init.zeros_(router.weight)
        torch.nn.init.zeros_(router.bias)
    x = rand(2, 63, DIM)
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


def test_selective_routing_invariants():
    torch.manual_seed(0)
    m = SelectiveAttention(DIM, 6, topk=2, expert_topk=4)
    x = torch.randn(3, 40, DIM)
    g, G = m.route(x)
    assert g.shape == (3, 40, 6) and G.shape == (3, 6)
    assert ((g > 0).sum(-1) == 2).all() and ((G > 0).sum(-1) == 4).all()
    torch.testing.assert_close(g.sum(-1), torch.full((3, 40), 2.0))
    torch.testing.assert_close(G.sum(-1), torch.full((3,), 4.0))
    probs = torch.softmax(m.token_router(x), -1)
    assert torch.equal(g > 0, torch.zeros_like(g, dtype=torch.bool).scatter(-1, probs.topk(2).indices, True))


def test_selective_head_sees_only_its_tokens():
    # a token that no head of a sequence selected contributes nothing to the attention (only the output bias)
    torch.manual_seed(0)
    m = SelectiveAttention(DIM, HEADS, topk=1, expert_topk=1).double()
    x = rand(1, 30, DIM)
    g, G = m.route(x)
    active = G[0].nonzero().item()
    outside = (g[0, :, active] == 0).nonzero().flatten()
    assert outside.numel() > 0
    y = m(x)
    torch.testing.assert_close(y[0, outside], m.out_proj.bias.expand(outside.numel(), DIM), atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_weights_are_the_selected_softmax(causal):
    """The probabilities inspect records: applied to the values and weighted by G_h g_{n,h}, they give the module's
    head outputs (so the output projection of them is the forward)."""
    torch.manual_seed(0)
    m = SelectiveAttention(DIM, HEADS, topk=2, expert_topk=3, causal=causal).double()
    x = rand(2, 21, DIM)
    p = m.attention_weights(x)  # (B, H, N, N)
    weight = m.head_weights(*m.route(x))  # (B, N, H)
    selected = (weight > 0).transpose(1, 2)  # (B, H, N)
    torch.testing.assert_close(p.sum(-1), selected.double(), atol=1e-12, rtol=0)
    assert (p[~(selected[..., :, None] & selected[..., None, :])] == 0).all()
    if causal:
        assert (p.triu(1) == 0).all()
    _, _, v = m.project(x)
    out = (p @ v) * weight.transpose(1, 2)[..., None]  # (B, H, N, D)
    torch.testing.assert_close(m.finish(out), m(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=50, heads=4), "dim must be divisible by heads"),
    (dict(topk=5), "topk must be at most heads=4"),
    (dict(topk=0), "topk"),
    (dict(expert_topk=9), "expert_topk must be at most heads=4"),
    (dict(causal=1), "causal"),
    (dict(kv_heads=3), "kv_heads"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("selective", **kw)


def test_bad_input_shape_raises():
    m = SelectiveAttention(DIM, HEADS)
    with pytest.raises(ValueError, match="dim"):
        m(torch.randn(2, 5, DIM + 1))


@pytest.mark.parametrize("spec", ["selective(topk=2, expert_topk=3, causal=True)", "selective(topk=4, causal=True)"])
def test_selective_causal_does_not_see_the_future(spec):
    """Changing tokens at and after t leaves every output before t unchanged (the prefix-pooled head gates)."""
    torch.manual_seed(0)
    m = headwise.create(spec, dim=DIM, heads=HEADS).double().eval()
    x = rand(2, 24, DIM)
    y = m(x)
    for t in (1, 7, 23):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:])
        torch.testing.assert_close(m(x2)[:, :t], y[:, :t], rtol=0, atol=1e-12)
