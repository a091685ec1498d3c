"""MoH and ReLU-routed MoH against their references written out from the papers' equations (float64)."""

import math

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.mha import MultiHeadAttention
from headwise.variants.moh import (
    MixtureOfHeadsAttention,
    ReLUMixtureOfHeadsAttention,
    naive_moh,
    naive_relu_moh,
)
from common import F64, assert_same_forward_and_grads, assert_same_grads, fused_checkpoint

# ---- MoH ----------------------------------------------------------------------------------------------------------

# (spec, heads, kv_heads, pattern, cross)
MOH = {
    "learned-S2-k3": ("moh(shared_heads=2, topk=3)", 8, None, None, False),
    "learned-S1-k1-causal": ("moh(shared_heads=1, topk=1)", 4, None, Causal(), False),
    "learned-S0-k2-gqa": ("moh(shared_heads=0, topk=2)", 6, 2, None, False),
    "learned-S3-k2-cross": ("moh(shared_heads=3, topk=2)", 6, 3, None, True),
    "norm-S4-k2-causal": ("moh(shared_heads=4, topk=2, router='norm')", 8, None, Causal(), False),
}


@pytest.mark.parametrize("compute", ["sparse", "dense"])
@pytest.mark.parametrize("case", MOH, ids=list(MOH))
def test_moh_matches_naive_float64(case, compute):
    spec, heads, kv_heads, pattern, cross = MOH[case]
    torch.manual_seed(0)
    m = headwise.create(spec, dim=48, heads=heads, kv_heads=kv_heads, pattern=pattern, compute=compute).to(F64)
    x = torch.randn(3, 29, 48, dtype=F64, requires_grad=True)
    context = torch.randn(3, 17, 48, dtype=F64, requires_grad=True) if cross else None
    assert_same_forward_and_grads(m(x, context), naive_moh(m, x, context),
                                  [x] + ([context] if cross else []) + list(m.parameters()), allow_unused=True)


def test_moh_causal_flag_is_the_causal_pattern():
    torch.manual_seed(0)
    flag = headwise.create("moh(shared_heads=1, topk=2)", dim=48, heads=4, causal=True).to(F64)
    assert flag.pattern == Causal()
    x = torch.randn(2, 29, 48, dtype=F64)
    torch.testing.assert_close(flag(x), naive_moh(flag, x), rtol=1e-10, atol=1e-10)


def test_moh_sparse_equals_dense_module():
    torch.manual_seed(0)
    sparse = headwise.create("moh(shared_heads=2, topk=2)", dim=64, heads=8, pattern=Causal()).to(F64)
    dense = headwise.create("moh(shared_heads=2, topk=2, compute='dense')", dim=64, heads=8, pattern=Causal()).to(F64)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 101, 64, dtype=F64)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sparse.aux_loss, dense.aux_loss, rtol=1e-12, atol=1e-12)
    assert_same_grads(sparse(x), dense(x), list(sparse.parameters()), ref_wrt=list(dense.parameters()),
                      allow_unused=True)


@pytest.mark.parametrize("S, K, H", [(2, 3, 8), (0, 4, 8), (5, 1, 6), (6, 0, 6)], ids=["S2-k3", "S0-k4", "S5-k1", "S6-k0"])
def test_moh_routing_invariants(S, K, H):
    """Exactly k routed heads per token; shared heads always on; routed weights sum to alpha_2 k, shared ones to
    alpha_1 h_s with alpha_1 + alpha_2 = 2; inactive heads have weight 0."""
    torch.manual_seed(0)
    m = MixtureOfHeadsAttention(48, H, shared_heads=S, topk=K).to(F64)
    x = torch.randn(2, 40, 48, dtype=F64)
    m(x)
    g, a = m.head_gates, m.head_active  # (B, N, H)
    assert a.dtype == torch.bool and a.shape == (2, 40, H)
    assert a[..., :S].all()
    assert (a[..., S:].sum(-1) == K).all()
    assert (g[~a] == 0).all() and (g[a] > 0).all()
    alpha = 2 * torch.softmax(x @ m.mix_router.weight.T, -1) if m.mix_router is not None else torch.ones(2, 40, 2, dtype=F64)
    if S:
        torch.testing.assert_close(g[..., :S].sum(-1), alpha[..., 0] * S, rtol=1e-12, atol=1e-12)
    if H - S:
        torch.testing.assert_close(g[..., S:].sum(-1), alpha[..., 1] * K, rtol=1e-12, atol=1e-12)


def test_moh_aux_loss_is_the_balance_statistic():
    torch.manual_seed(0)
    m = MixtureOfHeadsAttention(48, 8, shared_heads=2, topk=3).to(F64)
    x = torch.randn(2, 40, 48, dtype=F64)
    m(x)
    p = torch.softmax(x @ m.router.weight.T, -1)  # (B, N, E)
    f = m.head_active[..., 2:].to(F64).mean((0, 1))
    torch.testing.assert_close(m.aux_loss, 6 * (f * p.mean((0, 1))).sum(), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(m.aux_loss, m.router.weight)
    assert g.abs().sum() > 0
    with torch.no_grad():  # a uniform router balances perfectly: L_b = k
        m.router.weight.zero_()
        m(x)
    torch.testing.assert_close(m.aux_loss, torch.tensor(3.0, dtype=F64))


def test_moh_all_shared_unit_weights_equals_mha():
    """Every head shared with a uniform shared router (weights exactly 1) is MultiHeadAttention."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(64, 8, kv_heads=2, pattern=Causal()).to(F64)
    moh = MixtureOfHeadsAttention.from_mha(mha, shared_heads=8, topk=0, router="learned")
    with torch.no_grad():
        moh.shared_router.weight.zero_()
    x = torch.randn(2, 33, 64, dtype=F64)
    torch.testing.assert_close(moh(x), mha(x), rtol=1e-12, atol=1e-12)
    assert moh.head_active.all() and torch.equal(moh.head_gates, torch.ones(2, 33, 8, dtype=F64))


@pytest.mark.parametrize("compute", ["sparse", "dense"])
def test_from_mha_norm_router(compute):
    """The conversion copies the weights; with every routed head selected it is the MHA, else heads with the
    smallest query norms are dropped per token."""
    torch.manual_seed(0)
    mha = headwise.create("gqa", dim=64, heads=8, causal=True).to(F64)
    x = torch.randn(2, 45, 64, dtype=F64)
    full = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, topk=4, compute=compute)
    assert full.config.kv_heads == 2 and full.config.causal and full.router is None
    assert full.q_proj.weight.dtype == F64
    torch.testing.assert_close(full(x), mha(x), rtol=1e-12, atol=1e-12)
    half = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, topk=2, compute=compute)
    assert list(half.parameters()) and all(torch.equal(a, b) for a, b in zip(half.parameters(), mha.parameters()))
    assert [n for n, _ in half.named_parameters()] == [n for n, _ in mha.named_parameters()]
    torch.testing.assert_close(half(x), naive_moh(half, x), rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        MixtureOfHeadsAttention.from_mha(torch.nn.Linear(4, 4))


def test_top_k_is_renamed_topk_and_still_works():
    with pytest.warns(FutureWarning, match="top_k= is renamed topk="):
        old = headwise.create("moh(shared_heads=2, top_k=3)", dim=32, heads=8)
    assert old.config.topk == 3
    with pytest.warns(FutureWarning, match="top_k= is renamed topk="):
        direct = MixtureOfHeadsAttention(32, 8, top_k=1)
    assert direct.config.topk == 1
    mha = MultiHeadAttention(32, 8)
    with pytest.warns(FutureWarning, match="top_k= is renamed topk="):
        converted = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, top_k=2)
    assert converted.config.topk == 2


def test_old_fused_kv_checkpoint_loads():
    """Checkpoints of the MoH built on the old MultiHeadAttention (``kv_proj.*``: keys then values) still load."""
    torch.manual_seed(0)
    m = MixtureOfHeadsAttention(32, 4, kv_heads=2)
    fresh = MixtureOfHeadsAttention(32, 4, kv_heads=2)
    fresh.load_state_dict(fused_checkpoint(m.state_dict()))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(fresh(x), m(x))


# ---- ReLU-routed MoH ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [0, 3], ids=["S0", "S3"])
def test_relu_moh_matches_naive_and_sparse_equals_dense(S):
    torch.manual_seed(0)
    m = ReLUMixtureOfHeadsAttention(48, 6, shared_heads=S, pattern=Causal()).to(F64).eval()
    d = ReLUMixtureOfHeadsAttention(48, 6, shared_heads=S, pattern=Causal(), compute="dense").to(F64).eval()
    d.load_state_dict(m.state_dict())
    x = torch.randn(2, 31, 48, dtype=F64, requires_grad=True)
    out, ref = m(x), naive_relu_moh(m, x)
    assert_same_forward_and_grads(out, ref, [x] + list(m.parameters()), allow_unused=True)
    torch.testing.assert_close(d(x), out, rtol=1e-10, atol=1e-10)
    logits = x @ m.router.weight.T + m.router.bias
    assert torch.equal(m.head_active[..., S:], logits > 0)
    assert 0 < m.head_active[..., S:].float().mean() < 1  # some tokens skip some heads


def test_relu_moh_cross_attention_matches_naive():
    torch.manual_seed(0)
    m = ReLUMixtureOfHeadsAttention(48, 6, kv_heads=3, shared_heads=2).to(F64).eval()
    x = torch.randn(2, 13, 48, dtype=F64, requires_grad=True)
    context = torch.randn(2, 21, 48, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x, context), naive_relu_moh(m, x, context), [x, context] + list(m.parameters()),
                                  allow_unused=True)


def test_relu_moh_regulariser():
    torch.manual_seed(0)
    m = ReLUMixtureOfHeadsAttention(32, 4, shared_heads=2, target_active=0.5, spr_init=0.1, spr_rate=0.8).to(F64)
    x = torch.randn(2, 50, 32, dtype=F64)
    m.eval()
    lam = float(m.spr_weight)
    m(x)
    assert float(m.spr_weight) == lam == pytest.approx(0.1)  # frozen outside training
    rate = float(m.head_active[..., 2:].to(F64).mean())
    g = torch.relu(x @ m.router.weight.T + m.router.bias)
    f = (g > 0).to(F64).mean((0, 1))
    spr = lam * (f * g.mean((0, 1))).sum()
    hae = math.exp(2 * (0.5 - rate)) - 1 if rate < 0.5 else 0.0
    torch.testing.assert_close(m.aux_loss, spr + 0.5 * hae, rtol=1e-10, atol=1e-10)
    m.train()
    m(x)
    torch.testing.assert_close(m.spr_weight, torch.tensor(lam * math.exp(0.8 * (rate - 0.5)), dtype=F64))
    with torch.no_grad():  # every routed head off: HAE = e^{2T} - 1, and its surrogate gradient revives them
        m.router.bias.fill_(-30.0)
    m.eval()
    m(x)
    assert not m.head_active[..., 2:].any()
    torch.testing.assert_close(m.aux_loss, torch.tensor(0.5 * (math.e - 1), dtype=F64), rtol=1e-10, atol=1e-10)
    (gb,) = torch.autograd.grad(m.aux_loss, m.router.bias)
    assert (gb < 0).all()  # descending the loss raises the bias


# ---- contracts ------------------------------------------------------------------------------------------------------

# spec -> (create kwargs, N)
BAD = [
    ("moh", dict(dim=30, heads=8), ValueError, "divisible by heads"),
    ("moh", dict(dim=64, heads=8, shared_heads=2, topk=7), ValueError, "topk=7 exceeds the 6 routed heads"),
    ("moh", dict(dim=64, heads=8, shared_heads=2, topk=0), ValueError, "topk must be at least 1"),
    ("moh", dict(dim=64, heads=8, shared_heads=8, topk=1), ValueError, "topk=1 exceeds the 0 routed heads"),
    ("moh", dict(dim=64, heads=8, shared_heads=9), ValueError, "shared_heads must be"),
    ("moh", dict(dim=64, heads=8, router="hash"), ValueError, "router must be one of"),
    ("moh", dict(dim=64, heads=8, compute="lazy"), ValueError, "compute must be one of"),
    ("moh", dict(dim=64, heads=8, causal="yes"), ValueError, "causal must be a bool"),  # create: a bad config
    ("relu_moh", dict(dim=30, heads=8), ValueError, "divisible by heads"),
    ("relu_moh", dict(dim=64, heads=8, shared_heads=8), ValueError, "needs a routed"),
    ("relu_moh", dict(dim=64, heads=8, target_active=0.0), ValueError, r"target_active must be in \(0, 1\]"),
    ("relu_moh", dict(dim=64, heads=8, target_active=1.5), ValueError, r"target_active must be in \(0, 1\]"),
    ("relu_moh", dict(dim=64, heads=8, spr_init=-1.0), ValueError, "spr_init must be a positive"),
    ("relu_moh", dict(dim=64, heads=8, spr_rate=-0.5), ValueError, "spr_rate must be a number"),
]


@pytest.mark.parametrize("name, kw, exc, match", BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in BAD])
def test_bad_config_raises(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        headwise.create(name, **kw)
