"""Interventions: head masks equal zeroing weights by hand, scaling, hard-concrete masks, attention edits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import headwise
from headwise import patterns
from headwise.core.reference import naive_attention
from headwise.analysis import capture
from headwise.analysis import interventions as I


def by_hand(model, name, head, factor):
    """A copy of ``model`` with head ``head`` of module ``name`` scaled in the output-projection weights."""
    twin = copy.deepcopy(model)
    module = dict(twin.named_modules())[name]
    D = module.head_dim
    with torch.no_grad():
        module.out_proj.weight[:, head * D : (head + 1) * D] *= factor
    return twin


def test_head_modules(tiny_lm):
    assert list(I.head_modules(tiny_lm)) == ["blocks.0.attn", "blocks.1.attn"]
    assert I.head_modules(nn.MultiheadAttention(8, 2)) == {}


@pytest.mark.parametrize("how", ["prune", "mask"])
def test_masking_a_head_equals_zeroing_it_by_hand(tiny_lm, tokens, how):
    model = tiny_lm.double()
    ref = by_hand(model, "blocks.1.attn", 3, 0.0)(tokens)
    ctx = (I.prune_heads(model, {"blocks.1.attn": [3]}) if how == "prune"
           else I.mask_heads(model, {"blocks.1.attn": [1, 1, 1, 0]}))
    with ctx:
        out = model(tokens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    assert not torch.allclose(model(tokens), ref)  # and the hook is gone afterwards


def test_scaling_a_head_equals_scaling_its_weights(tiny_lm, tokens):
    model = tiny_lm.double()
    ref = by_hand(model, "blocks.0.attn", 1, 2.5)(tokens)
    with I.scale_heads(model, {"blocks.0.attn": [1.0, 2.5, 1.0, 1.0]}):
        out = model(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("gates, match", [({"nope": [1.0] * 4}, "unknown head module"),
                                          ({"blocks.0.attn": [1.0] * 3}, r"shape \[4\]")],
                         ids=["bad-name", "bad-shape"])
def test_scale_heads_bad_input(tiny_lm, gates, match):
    with pytest.raises(ValueError, match=match):
        with I.scale_heads(tiny_lm, gates):
            pass


def test_prune_heads_bad_index(tiny_lm):
    with pytest.raises(ValueError, match="out of range"):
        with I.prune_heads(tiny_lm, {"blocks.0.attn": [4]}):
            pass


# ---- hard concrete ----------------------------------------------------------------------------------------


def test_hard_concrete_gates_and_expected_l0(tiny_lm):
    gates = I.HardConcreteHeadMask(tiny_lm, budget=3)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.linspace(-3, 3, 8))
    torch.manual_seed(0)
    samples = torch.stack([torch.cat([gates.gates(n) for n in gates.names]) for _ in range(1000)])  # (S, 8)
    assert samples.min() >= 0 and samples.max() <= 1 and (samples == 0).any() and (samples == 1).any()
    torch.testing.assert_close((samples > 0).double().mean(0), gates.open_probability().detach().double(),
                               atol=0.06, rtol=0)
    gates.eval()
    g = gates.gates("blocks.1.attn")
    assert torch.equal(g, gates.gates("blocks.1.attn"))  # deterministic
    keep = gates.keep_mask()
    assert sum(int(k.sum()) for k in keep.values()) == 3
    assert keep["blocks.1.attn"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_hard_concrete_learns_the_useful_head_within_budget():
    torch.manual_seed(0)
    model = headwise.create("mha", dim=16, heads=4)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(8, 6, 16)
    with torch.no_grad(), I.prune_heads(model, {"": [0, 2, 3]}):
        target = model(x)  # only head 1 matters
    gates = I.HardConcreteHeadMask(model, budget=1, init_keep=0.5)
    opt = torch.optim.Adam(gates.parameters(), lr=0.2)
    for _ in range(60):
        with gates.attach(model):
            loss = (model(x) - target).pow(2).mean() + 1.0 * gates.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gates.keep_mask()[""].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert abs(gates.expected_heads().item() - 1) < 0.5


@pytest.mark.parametrize("kw", [{"budget": 0}, {"budget": 9}, {"budget": 2, "init_keep": 1.0}])
def test_hard_concrete_bad_config(tiny_lm, kw):
    with pytest.raises(ValueError):
        I.HardConcreteHeadMask(tiny_lm, **kw)


# ---- attention edits ----------------------------------------------------------------------------------------


def test_identity_edit_reproduces_the_output(tiny_lm, tokens):
    model = tiny_lm.double()
    ref = model(tokens)
    with I.edit_attention(model, lambda name, p: p):
        out = model(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_edit_of_one_head_equals_the_hand_computation():
    torch.manual_seed(0)
    m = headwise.create("gqa(pattern='causal')", dim=32, heads=4, kv_heads=2).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    uniform = lambda name, p: torch.tril(torch.ones_like(p)) / torch.arange(1, 8).to(p)[:, None]  # noqa: E731
    with I.edit_attention(m, uniform, heads={"": [2]}):
        out = m(x)
    q, k, v = m.project(x)  # (B, H, N, D), (B, H_kv, N, D) x 2
    o, _ = naive_attention(q, k, v, patterns.Causal())  # (B, H, N, D)
    U = torch.tril(torch.ones(7, 7, dtype=torch.float64)) / torch.arange(1, 8, dtype=torch.float64)[:, None]
    o[:, 2] = U @ v[:, 1]  # head 2 reads key/value head 1
    ref = m.out_proj(o.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_var_redistribution_keeps_rows_and_moves_sink_mass():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64), -1)
    q = I.redistribute_sinks(p, sinks=[0], targets=[2, 3, 4, 0], ratio=0.6)
    torch.testing.assert_close(q.sum(-1), p.sum(-1))
    torch.testing.assert_close(q[..., 0], 0.4 * p[..., 0])
    moved = 0.6 * p[..., 0]
    t = p[..., 2:5]
    torch.testing.assert_close(q[..., 2:5], t + moved[..., None] * t / t.sum(-1, keepdim=True))
    torch.testing.assert_close(q[..., [1, 5, 6, 7]], p[..., [1, 5, 6, 7]])


def test_token_emphasis_with_head_modulation():
    p = torch.full((1, 2, 3, 4), 0.25, dtype=torch.float64)
    q = I.emphasize_tokens(p, tokens=[1], strength=2.0, head_weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(q[0, 1], p[0, 1])  # weight 0: untouched
    torch.testing.assert_close(q[0, 0, 0], torch.tensor([1, 3, 1, 1], dtype=torch.float64) / 6)


def test_var_through_edit_attention_changes_the_model(tiny_lm, tokens):
    model = tiny_lm.double()
    ref = model(tokens)
    var = lambda name, p: I.redistribute_sinks(p, sinks=[0], targets=range(1, 16))  # noqa: E731
    with I.edit_attention(model, var, heads={"blocks.1.attn": [0, 1]}):
        out = model(tokens)
    assert not torch.allclose(out, ref)
    assert torch.isfinite(out).all()


def test_edit_attention_needs_one_attention_call():
    torch.manual_seed(0)
    m = headwise.create("mha", dim=16, heads=2)
    pad = torch.zeros(1, 5, dtype=torch.bool)
    pad[0, 4] = True
    with pytest.raises(RuntimeError, match="exactly one"):
        with I.edit_attention(m, lambda name, p: p):
            m(torch.randn(1, 5, 16), key_padding_mask=pad)  # dense SDPA path: no headwise.attention call
