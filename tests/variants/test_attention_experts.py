"""attention_experts (BAM) and selective (Union of Experts SMHA): references, degenerate cases, routing."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.experts import (
    AttentionExperts,
    SelectiveAttention,
    naive_attention_experts,
    naive_selective_attention,
    top_k_gates,
    upcycle_attention,
)
from headwise.variants.mha import MultiHeadAttention

DIM, HEADS = 48, 4


def _x(B=2, N=63, dim=DIM, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, dim, generator=g, dtype=dtype).requires_grad_(True)


def _grads(module, x, y):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    params = [p for p in module.parameters()]
    return torch.autograd.grad(y, [x, *params], g)


def _assert_same_forward_backward(module, fast, naive, x, atol=1e-10):
    y_fast, y_naive = fast(x), naive(x)
    torch.testing.assert_close(y_fast, y_naive, atol=atol, rtol=0)
    for a, b in zip(_grads(module, x, y_fast), _grads(module, x, y_naive)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


SPECS = ["attention_experts", "attention_experts(share_kv=True, topk=2)", "selective",
         "selective(topk=1, expert_topk=2, causal=True)"]


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


# ---- attention_experts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("share_kv", [False, True], ids=["own-kv", "shared-kv"])
@pytest.mark.parametrize("topk,causal", [(None, False), (2, True)], ids=["soft-full", "top2-causal"])
def test_attention_experts_matches_naive(N, share_kv, topk, causal):
    torch.manual_seed(0)
    m = AttentionExperts(DIM, HEADS, experts=3, share_kv=share_kv, topk=topk,
                         pattern=Causal() if causal else None).double()
    _assert_same_forward_backward(m, m, lambda x: naive_attention_experts(m, x), _x(N=N))


def test_one_expert_equals_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal()).double()
    moa = upcycle_attention([mha])
    x = _x()
    torch.testing.assert_close(moa(x), mha(x), atol=1e-12, rtol=0)
    # the registered constructor with experts=1 and the same weights, against the reference backend
    m = AttentionExperts(DIM, HEADS, experts=1, pattern=Causal(), backend="reference").double()
    m.load_state_dict(moa.state_dict())
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("share_kv", [False, True], ids=["own-kv", "shared-kv"])
def test_upcycle_mixes_the_dense_layers(share_kv):
    torch.manual_seed(0)
    layers = [MultiHeadAttention(DIM, HEADS).double() for _ in range(3)]
    moa = upcycle_attention(layers, share_kv=share_kv)
    assert moa.experts == 3 and moa.config.share_kv == share_kv and moa.q_weight.dtype == torch.float64
    x = _x(N=20)
    gates = moa.route(x)  # (B, N, E)
    if share_kv:  # each expert's k, v are the average of the layers'
        kv_w = torch.stack([m.kv_proj.weight for m in layers]).mean(0)
        kv_b = torch.stack([m.kv_proj.bias for m in layers]).mean(0)
        for m in layers:
            m.kv_proj.weight.data.copy_(kv_w)
            m.kv_proj.bias.data.copy_(kv_b)
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
    with pytest.raises(ValueError, match="kv_heads"):
        upcycle_attention([MultiHeadAttention(DIM, HEADS, kv_heads=2)])


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


# ---- selective ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("topk,expert_topk,causal", [(2, 4, False), (1, 3, True), (3, 2, False)],
                         ids=["k2-e4", "k1-e3-causal", "k3-e2"])
def test_selective_matches_naive(N, topk, expert_topk, causal):
    torch.manual_seed(0)
    m = SelectiveAttention(DIM, HEADS, topk=topk, expert_topk=expert_topk, causal=causal).double()
    _assert_same_forward_backward(m, m, lambda x: naive_selective_attention(m, x), _x(N=N))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_selective_all_heads_uniform_router_equals_mha(causal):
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal() if causal else None, backend="reference").double()
    m = SelectiveAttention(DIM, HEADS, topk=HEADS, expert_topk=HEADS, causal=causal).double()
    m.load_state_dict(mha.state_dict(), strict=False)
    for router in (m.token_router, m.expert_router):
        torch.nn.init.zeros_(router.weight)
        torch.nn.init.zeros_(router.bias)
    x = _x()
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
    x = _x(B=1, N=30).detach()
    g, G = m.route(x)
    active = G[0].nonzero().item()
    outside = (g[0, :, active] == 0).nonzero().flatten()
    assert outside.numel() > 0
    y = m(x)
    torch.testing.assert_close(y[0, outside], m.out_proj.bias.expand(outside.numel(), DIM), atol=1e-12, rtol=0)


def test_top_k_gates():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    torch.testing.assert_close(top_k_gates(p, 2), torch.tensor([[0.0, 4 / 3.5, 0.0, 3 / 3.5]]))


# ---- bad configs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,kwargs,match", [
    ("attention_experts", dict(dim=50, heads=4), "dim must be divisible by heads"),
    ("attention_experts", dict(experts=0), "experts"),
    ("attention_experts", dict(experts=2, topk=3), "topk must be at most experts=2"),
    ("attention_experts", dict(share_kv="yes"), "share_kv"),
    ("selective", dict(dim=50, heads=4), "dim must be divisible by heads"),
    ("selective", dict(topk=5), "topk must be at most heads=4"),
    ("selective", dict(topk=0), "topk"),
    ("selective", dict(expert_topk=9), "expert_topk must be at most heads=4"),
    ("selective", dict(causal=1), "causal"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(spec, kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create(spec, **kw)


def test_bad_input_shape_raises():
    m = SelectiveAttention(DIM, HEADS)
    with pytest.raises(ValueError, match="dim"):
        m(torch.randn(2, 5, DIM + 1))


@pytest.mark.parametrize("spec", ["selective(topk=2, expert_topk=3, causal=True)", "selective(topk=4, causal=True)"])
def test_selective_causal_does_not_see_the_future(spec):
    """Changing tokens at and after t leaves every output before t unchanged (the prefix-pooled head gates)."""
    torch.manual_seed(0)
    m = headwise.create(spec, dim=DIM, heads=HEADS).double().eval()
    x = _x(B=2, N=24).detach()
    y = m(x)
    for t in (1, 7, 23):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:])
        torch.testing.assert_close(m(x2)[:, :t], y[:, :t], rtol=0, atol=1e-12)
