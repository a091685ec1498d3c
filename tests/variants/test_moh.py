"""MoH, ReLU-routed MoH, single-head and cascaded group attention against float64 computations written out here."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.patterns import Causal, Full, PerHead
from headwise.variants.heads import (
    CascadedGroupAttention,
    MixtureOfHeadsAttention,
    ReLUMixtureOfHeadsAttention,
    SingleHeadAttention,
    dense_head_mixture,
    gather_head_mixture,
)
from headwise.variants.mha import MultiHeadAttention

F64 = torch.float64


def grads(out, wrt, seed=0):
    """Gradients of a fixed random projection of ``out`` (no symmetric cancellation)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), wrt, allow_unused=True)


def assert_same_grads(out, ref, wrt, tol=1e-10):
    for a, b in zip(grads(out, wrt), grads(ref, wrt)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def naive_heads(q, k, v, pattern, scale=None):
    """Per-head softmax attention, materialized: ``[B, H, N, Dv]`` (rows with no key are zero)."""
    H, N, M = q.shape[1], q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, M, D)
    v = v.repeat_interleave(H // v.shape[1], dim=1)  # (B, H, M, Dv)
    s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)  # (B, H, N, M)
    if pattern is not None:
        s = s.masked_fill(~pattern.dense_mask(N, M)[None], -math.inf)
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v  # (B, H, N, Dv)


def top_k_mask(scores, k):
    return F.one_hot(scores.topk(k, dim=-1).indices, scores.shape[-1]).sum(-2).bool()  # (..., E)


def naive_moh(m, x, context=None):
    """MoH from the paper's equations (with the authors' scalings) and the module's weights: projections,
    materialized per-head attention, the router, the weighted head sum, the output projection."""
    c = x if context is None else context
    B, N, _ = x.shape
    M = c.shape[1]
    H, H_kv, D, S, K = m.heads, m.kv_heads, m.head_dim, m.shared_heads, m.top_k
    E = H - S
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    kv = F.linear(c, m.kv_proj.weight, m.kv_proj.bias).view(B, M, 2, H_kv, D)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H_kv, M, D)
    heads = naive_heads(q, k, v, m.pattern)  # (B, H, N, D)
    g_shared = torch.ones(B, N, S, dtype=x.dtype)
    if m.config.router == "norm":
        chosen = top_k_mask(q[:, S:].norm(dim=-1).transpose(1, 2), K)  # (B, N, E) by query norm
        g_routed = chosen.to(x.dtype)
    else:
        p = torch.softmax(x @ m.router.weight.T, dim=-1)  # (B, N, E)
        chosen = top_k_mask(p, K)
        g_routed = K * p * chosen / (p * chosen).sum(-1, keepdim=True)
        if S > 1:
            g_shared = S * torch.softmax(x @ m.shared_router.weight.T, dim=-1)
        if S and E:
            alpha = 2 * torch.softmax(x @ m.mix_router.weight.T, dim=-1)  # (B, N, 2)
            g_shared, g_routed = g_shared * alpha[..., :1], g_routed * alpha[..., 1:]
    g = torch.cat([g_shared, g_routed], dim=-1)  # (B, N, H)
    out = (heads.transpose(1, 2) * g[..., None]).reshape(B, N, H * D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)


def naive_relu_moh(m, x):
    B, N, _ = x.shape
    H, D, S = m.heads, m.head_dim, m.shared_heads
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)
    kv = F.linear(x, m.kv_proj.weight, m.kv_proj.bias).view(B, N, 2, m.kv_heads, D)
    heads = naive_heads(q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), m.pattern)  # (B, H, N, D)
    g_routed = torch.relu(x @ m.router.weight.T + m.router.bias)  # (B, N, E)
    g_shared = torch.ones(B, N, S, dtype=x.dtype)
    if S:
        alpha = torch.softmax(x @ m.mix_router.weight.T, dim=-1)
        g_shared, g_routed = g_shared * alpha[..., :1], g_routed * alpha[..., 1:]
    g = torch.cat([g_shared, g_routed], dim=-1)
    return F.linear((heads.transpose(1, 2) * g[..., None]).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)


# ---- the functional core ----------------------------------------------------------------------------------------

# (B, H, H_kv, N, M, pattern): odd sizes, GQA, cross-attention, causal, head-specific with empty rows
MIXTURES = {
    "B1-H4-N1": (1, 4, 4, 1, 1, None),
    "B2-H4-kv2-N63-causal": (2, 4, 2, 63, 63, Causal()),
    "B3-H6-kv3-N37-M50": (3, 6, 3, 37, 50, None),
    "B2-H4-N63-perhead": (2, 4, 4, 63, 63, PerHead([Causal(), Full(), Causal(offset=-5), Causal(offset=3)])),
    "B1-H4-N500-causal": (1, 4, 1, 500, 500, Causal()),
}


@pytest.mark.parametrize("backend", ["sdpa", "blocksparse", "auto"])
@pytest.mark.parametrize("case", MIXTURES, ids=list(MIXTURES))
def test_gather_matches_dense_reference(case, backend):
    """Gathering each head's tokens gives the dense masked mixture, forward and gradients (float64)."""
    B, H, H_kv, N, M, pattern = MIXTURES[case]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, N, 8, dtype=F64, generator=gen, requires_grad=True)
    k = torch.randn(B, H_kv, M, 8, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(B, H_kv, M, 5, dtype=F64, generator=gen, requires_grad=True)
    gates = torch.rand(B, N, H, dtype=F64, generator=gen, requires_grad=True)
    active = torch.rand(B, N, H, generator=gen) < 0.5
    active[:, :, 0] = True  # a shared head
    active[:, :, -1] = False  # a head no token uses
    out = gather_head_mixture(q, k, v, gates, active, pattern, backend=backend)
    ref = dense_head_mixture(q, k, v, gates, active, pattern, backend="reference")
    assert out.shape == (B, N, H, 5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert out[~active].abs().max() == 0 if (~active).any() else True
    assert_same_grads(out, ref, [q, k, v, gates])


def test_dense_reference_is_masked_weighted_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 11, 4, dtype=F64, generator=gen) for _ in range(3))
    gates = torch.rand(2, 11, 3, dtype=F64, generator=gen)
    active = torch.rand(2, 11, 3, generator=gen) < 0.6
    ref = naive_heads(q, k, v, Causal()).transpose(1, 2) * (gates * active)[..., None]  # (B, N, H, D)
    torch.testing.assert_close(dense_head_mixture(q, k, v, gates, active, Causal()), ref, rtol=1e-12, atol=1e-12)


def test_mixture_rejects_bad_gates():
    q = k = v = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="gates must be"):
        gather_head_mixture(q, k, v, torch.ones(1, 2, 5), torch.ones(1, 5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="active must be a bool"):
        dense_head_mixture(q, k, v, torch.ones(1, 5, 2), torch.ones(1, 5, 2))


# ---- MoH ----------------------------------------------------------------------------------------------------------

# (spec, heads, kv_heads, pattern, cross)
MOH = {
    "learned-S2-k3": ("moh(shared_heads=2, top_k=3)", 8, None, None, False),
    "learned-S1-k1-causal": ("moh(shared_heads=1, top_k=1)", 4, None, Causal(), False),
    "learned-S0-k2-gqa": ("moh(shared_heads=0, top_k=2)", 6, 2, None, False),
    "learned-S3-k2-cross": ("moh(shared_heads=3, top_k=2)", 6, 3, None, True),
    "norm-S4-k2-causal": ("moh(shared_heads=4, top_k=2, router='norm')", 8, None, Causal(), False),
}


@pytest.mark.parametrize("compute", ["sparse", "dense"])
@pytest.mark.parametrize("case", MOH, ids=list(MOH))
def test_moh_matches_naive_float64(case, compute):
    spec, heads, kv_heads, pattern, cross = MOH[case]
    torch.manual_seed(0)
    m = headwise.create(spec, dim=48, heads=heads, kv_heads=kv_heads, pattern=pattern, compute=compute).to(F64)
    x = torch.randn(3, 29, 48, dtype=F64, requires_grad=True)
    context = torch.randn(3, 17, 48, dtype=F64, requires_grad=True) if cross else None
    out = m(x, context)
    ref = naive_moh(m, x, context)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_same_grads(out, ref, [x] + ([context] if cross else []) + list(m.parameters()))


def test_moh_sparse_equals_dense_module():
    torch.manual_seed(0)
    sparse = headwise.create("moh(shared_heads=2, top_k=2)", dim=64, heads=8, pattern=Causal()).to(F64)
    dense = headwise.create("moh(shared_heads=2, top_k=2, compute='dense')", dim=64, heads=8, pattern=Causal()).to(F64)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 101, 64, dtype=F64)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sparse.aux_loss, dense.aux_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(sparse(x), list(sparse.parameters())), grads(dense(x), list(dense.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("S, K, H", [(2, 3, 8), (0, 4, 8), (5, 1, 6), (6, 0, 6)], ids=["S2-k3", "S0-k4", "S5-k1", "S6-k0"])
def test_moh_routing_invariants(S, K, H):
    """Exactly k routed heads per token; shared heads always on; routed weights sum to alpha_2 k, shared ones to
    alpha_1 h_s with alpha_1 + alpha_2 = 2; inactive heads have weight 0."""
    torch.manual_seed(0)
    m = MixtureOfHeadsAttention(48, H, shared_heads=S, top_k=K).to(F64)
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
    m = MixtureOfHeadsAttention(48, 8, shared_heads=2, top_k=3).to(F64)
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
    moh = MixtureOfHeadsAttention.from_mha(mha, shared_heads=8, top_k=0, router="learned")
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
    mha = headwise.create("gqa", dim=64, heads=8, pattern=Causal()).to(F64)
    x = torch.randn(2, 45, 64, dtype=F64)
    full = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, top_k=4, compute=compute)
    assert full.config.kv_heads == 2 and full.router is None and full.q_proj.weight.dtype == F64
    torch.testing.assert_close(full(x), mha(x), rtol=1e-12, atol=1e-12)
    half = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, top_k=2, compute=compute)
    assert list(half.parameters()) and all(torch.equal(a, b) for a, b in zip(half.parameters(), mha.parameters()))
    torch.testing.assert_close(half(x), naive_moh(half, x), rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        MixtureOfHeadsAttention.from_mha(torch.nn.Linear(4, 4))


# ---- ReLU-routed MoH ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [0, 3], ids=["S0", "S3"])
def test_relu_moh_matches_naive_and_sparse_equals_dense(S):
    torch.manual_seed(0)
    m = ReLUMixtureOfHeadsAttention(48, 6, shared_heads=S, pattern=Causal()).to(F64).eval()
    d = ReLUMixtureOfHeadsAttention(48, 6, shared_heads=S, pattern=Causal(), compute="dense").to(F64).eval()
    d.load_state_dict(m.state_dict())
    x = torch.randn(2, 31, 48, dtype=F64, requires_grad=True)
    out, ref = m(x), naive_relu_moh(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d(x), out, rtol=1e-10, atol=1e-10)
    assert_same_grads(out, ref, [x] + list(m.parameters()))
    logits = x @ m.router.weight.T + m.router.bias
    assert torch.equal(m.head_active[..., S:], logits > 0)
    assert 0 < m.head_active[..., S:].float().mean() < 1  # some tokens skip some heads


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


# ---- single-head and cascaded group attention --------------------------------------------------------------------


def naive_single_head(m: SingleHeadAttention, x):
    B, N, C = x.shape
    p, d = m.pdim, m.qk_dim
    x1, x2 = x[..., :p], x[..., p:]
    dims = (1, 2) if m.config.norm == "group" else (2,)  # GroupNorm(1): over the sequence; LayerNorm: per token
    mu = x1.mean(dims, keepdim=True)
    var = x1.var(dims, unbiased=False, keepdim=True)
    x1 = (x1 - mu) / torch.sqrt(var + m.pre_norm.eps) * m.pre_norm.weight + m.pre_norm.bias
    qkv = x1 @ m.qkv.weight.T + m.qkv.bias
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    o = naive_heads(q[:, None], k[:, None], v[:, None], m.pattern)[:, 0]
    return torch.relu(torch.cat([o, x2], -1)) @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize("partial, pattern, norm", [(0.25, None, "group"), (1.0, Causal(), "layer"), (0.3, None, "layer")],
                         ids=["p0.25", "p1-causal-layer", "p0.3-layer"])
def test_single_head_matches_naive(partial, pattern, norm):
    torch.manual_seed(0)
    m = SingleHeadAttention(40, partial=partial, qk_dim=8, pattern=pattern, norm=norm).to(F64)
    assert m.pdim == round(partial * 40)
    with torch.no_grad():
        m.pre_norm.weight.normal_(), m.pre_norm.bias.normal_()
    x = torch.randn(3, 23, 40, dtype=F64, requires_grad=True)
    out, ref = m(x), naive_single_head(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_same_grads(out, ref, [x] + list(m.parameters()))


def naive_depthwise(t, weight, bias, grid):
    """Zero-padded depthwise cross-correlation of tokens ``t`` ``[B, N, d]`` by explicit shifted sums."""
    B, N, d = t.shape
    k = weight.shape[-1]
    r = k // 2
    if grid is None:
        pad = F.pad(t, (0, 0, r, r))  # (B, N + 2r, d)
        return sum(pad[:, j : j + N] * weight[:, 0, j] for j in range(k)) + bias
    rows, cols = grid
    img = F.pad(t.view(B, rows, cols, d), (0, 0, r, r, r, r))  # (B, rows + 2r, cols + 2r, d)
    out = sum(img[:, i : i + rows, j : j + cols] * weight[:, 0, i, j] for i in range(k) for j in range(k))
    return (out + bias).reshape(B, N, d)


def naive_cascaded(m: CascadedGroupAttention, x):
    s, kd = m.split, m.key_dim
    outs = []
    for i in range(m.heads):
        feat = x[..., i * s : (i + 1) * s] + (outs[-1] if outs else 0)
        qkv = feat @ m.qkvs[i].weight.T + m.qkvs[i].bias
        q, k, v = qkv[..., :kd], qkv[..., kd : 2 * kd], qkv[..., 2 * kd :]
        q = naive_depthwise(q, m.dws[i].weight, m.dws[i].bias, m.grid)
        pattern = m.pattern
        if isinstance(pattern, PerHead):
            pattern = pattern.patterns[i]
        outs.append(naive_heads(q[:, None], k[:, None], v[:, None], pattern)[:, 0])
    y = torch.cat(outs, -1)
    return (torch.relu(y) if m.config.proj_relu else y) @ m.proj.weight.T + m.proj.bias


CASCADES = {
    "H4-1d-k5": dict(heads=4, N=37),
    "H4-grid5x7-k3": dict(heads=4, N=35, grid=(5, 7), kernel_size=3),
    "H2-1d-perhead": dict(heads=2, N=30, pattern=PerHead([Causal(), Causal(offset=-4)])),
}


@pytest.mark.parametrize("case", CASCADES, ids=list(CASCADES))
def test_cascaded_group_matches_naive(case):
    cfg = dict(CASCADES[case])
    N = cfg.pop("N")
    torch.manual_seed(0)
    m = CascadedGroupAttention(32, key_dim=6, **cfg).to(F64)
    x = torch.randn(2, N, 32, dtype=F64, requires_grad=True)
    out, ref = m(x), naive_cascaded(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_same_grads(out, ref, [x] + list(m.parameters()))


def test_cascade_feeds_each_head_the_previous_output():
    """Changing the first channel split changes every head's output (through the cascade), not only head 1's."""
    torch.manual_seed(0)
    m = CascadedGroupAttention(32, 4, key_dim=6, proj_relu=False).to(F64)
    x = torch.randn(1, 12, 32, dtype=F64)
    y = x.clone()
    y[..., :8] += 1.0
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(32, dtype=F64)), m.proj.bias.zero_()
        d = (m(x) - m(y)).abs().amax(dim=(0, 1)).view(4, 8).amax(-1)  # per head
    assert (d > 1e-6).all()


def test_single_head_causal_needs_per_token_norm():
    with pytest.raises(ValueError, match="norm='layer'"):
        SingleHeadAttention(40, pattern=Causal(), norm="group")
    torch.manual_seed(0)
    m = SingleHeadAttention(40, pattern=Causal()).to(F64)  # norm="auto": per token
    x = torch.randn(2, 20, 40, dtype=F64)
    y = m(x)
    x2 = x.clone()
    x2[:, 9:] = torch.randn_like(x2[:, 9:])
    torch.testing.assert_close(m(x2)[:, :9], y[:, :9], rtol=0, atol=1e-12)


def test_cascaded_one_group_is_single_head_attention():
    """One group, an identity 1x1 convolution and no ReLU: MultiHeadAttention with one head and the same weights."""
    torch.manual_seed(0)
    cga = CascadedGroupAttention(24, 1, key_dim=24, kernel_size=1, proj_relu=False, pattern=Causal()).to(F64)
    mha = MultiHeadAttention(24, 1, pattern=Causal()).to(F64)
    with torch.no_grad():
        cga.dws[0].weight.fill_(1.0), cga.dws[0].bias.zero_()
        mha.q_proj.weight.copy_(cga.qkvs[0].weight[:24]), mha.q_proj.bias.copy_(cga.qkvs[0].bias[:24])
        mha.kv_proj.weight.copy_(cga.qkvs[0].weight[24:]), mha.kv_proj.bias.copy_(cga.qkvs[0].bias[24:])
        mha.out_proj.load_state_dict(cga.proj.state_dict())
    x = torch.randn(2, 19, 24, dtype=F64)
    torch.testing.assert_close(cga(x), mha(x), rtol=1e-12, atol=1e-12)


def test_cascaded_grid_must_match_tokens():
    m = CascadedGroupAttention(16, 2, grid=(4, 4), kernel_size=3)
    with pytest.raises(ValueError, match=r"grid=\(4, 4\) does not multiply to N=15"):
        m(torch.randn(1, 15, 16))


# ---- contracts shared by every module of the family --------------------------------------------------------------

# spec -> (create kwargs, N)
CONTRACT = {
    "moh": ("moh(shared_heads=2, top_k=3)", dict(heads=8), 33),
    "moh-norm": ("moh(router='norm')", dict(heads=8), 33),
    "moh-dense": ("moh(compute='dense')", dict(heads=8), 33),
    "relu_moh": ("relu_moh", dict(heads=8), 33),
    "single_head": ("single_head", dict(), 33),
    "cascaded_group": ("cascaded_group", dict(heads=4), 33),
    "cascaded_group-grid": ("cascaded_group(grid=(3, 11), kernel_size=3)", dict(heads=4), 33),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("name", CONTRACT, ids=list(CONTRACT))
def test_shape_and_dtype(name, dtype):
    spec, kw, N = CONTRACT[name]
    torch.manual_seed(0)
    m = headwise.create(spec, dim=64, **kw).to(dtype)
    y = m(torch.randn(2, N, 64, dtype=dtype))
    assert y.shape == (2, N, 64) and y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", CONTRACT, ids=list(CONTRACT))
def test_gradients_reach_every_parameter(name):
    spec, kw, N = CONTRACT[name]
    torch.manual_seed(0)
    m = headwise.create(spec, dim=64, **kw)
    x = torch.randn(2, N, 64, requires_grad=True)
    loss = m(x).square().sum()
    if hasattr(m, "aux_loss"):
        loss = loss + m.aux_loss
    loss.backward()
    for pname, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", CONTRACT, ids=list(CONTRACT))
def test_deterministic_under_seed(name):
    spec, kw, N = CONTRACT[name]
    x = torch.randn(2, N, 64, generator=torch.Generator().manual_seed(3))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        m = headwise.create(spec, dim=64, **kw).eval()
        outs += [m(x), m(x)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ---- bad configurations -------------------------------------------------------------------------------------------

BAD = [
    ("moh", dict(dim=30, heads=8), ValueError, "divisible by heads"),
    ("moh", dict(dim=64, heads=8, shared_heads=2, top_k=7), ValueError, "top_k=7 exceeds the 6 routed heads"),
    ("moh", dict(dim=64, heads=8, shared_heads=2, top_k=0), ValueError, "top_k must be at least 1"),
    ("moh", dict(dim=64, heads=8, shared_heads=8, top_k=1), ValueError, "top_k=1 exceeds the 0 routed heads"),
    ("moh", dict(dim=64, heads=8, shared_heads=9), ValueError, "shared_heads must be"),
    ("moh", dict(dim=64, heads=8, router="hash"), ValueError, "router must be one of"),
    ("moh", dict(dim=64, heads=8, compute="lazy"), ValueError, "compute must be one of"),
    ("relu_moh", dict(dim=30, heads=8), ValueError, "divisible by heads"),
    ("relu_moh", dict(dim=64, heads=8, shared_heads=8), ValueError, "needs a routed"),
    ("relu_moh", dict(dim=64, heads=8, target_active=0.0), ValueError, r"target_active must be in \(0, 1\]"),
    ("relu_moh", dict(dim=64, heads=8, target_active=1.5), ValueError, r"target_active must be in \(0, 1\]"),
    ("relu_moh", dict(dim=64, heads=8, spr_init=-1.0), ValueError, "spr_init must be a positive"),
    ("single_head", dict(dim=64, partial=0.0), ValueError, r"partial must be a fraction in \(0, 1\]"),
    ("single_head", dict(dim=64, partial=1.5), ValueError, r"partial must be a fraction in \(0, 1\]"),
    ("single_head", dict(dim=64, partial=-0.2), ValueError, r"partial must be a fraction in \(0, 1\]"),
    ("single_head", dict(dim=64, partial=0.001), ValueError, "leaves no channel"),
    ("single_head", dict(dim=64, heads=8), ValueError, "unknown config key"),
    ("cascaded_group", dict(dim=30, heads=4), ValueError, "divisible by heads"),
    ("cascaded_group", dict(dim=32, heads=4, kernel_size=4), ValueError, "kernel_size must be odd"),
    ("cascaded_group", dict(dim=32, heads=4, kernel_size=5, grid=(3, 8)), ValueError, r"kernel_size=5 exceeds grid=\(3, 8\)"),
    ("cascaded_group", dict(dim=32, heads=4, grid=(3,)), ValueError, "grid must be None or"),
    ("cascaded_group", dict(dim=32, heads=4, pattern=PerHead([Full(), Full()])), ValueError, "2 heads but the module has 4"),
]


@pytest.mark.parametrize("name, kw, exc, match", BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in BAD])
def test_bad_config_raises(name, kw, exc, match):
    with pytest.raises(exc, match=match):
        headwise.create(name, **kw)


def test_single_head_norm_auto_is_group_unless_causal():
    assert SingleHeadAttention(32).config.norm == "group"
    assert SingleHeadAttention(32, pattern=Causal()).config.norm == "layer"
