"""MEDUSA multi-scale heads, DCAL's GLCA/PWCA and attention rollout, dictionary cross-attention and ACMIL pooling
against MultiHeadAttention with the same weights and float64 computations written out here."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.cross import (
    DictionaryCrossAttention,
    GlobalLocalCrossAttention,
    MILAttention,
    MultiScaleHeads,
    PairwiseCrossAttention,
    SharedKVAttention,
    WindowCrossAttention,
    attention_rollout,
    naive_window_cross_attention,
    relative_position_index,
    reliability_balance,
)
from headwise.variants.mha import MultiHeadAttention

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_all_params_get_grads(module, out):
    """Every trainable parameter gets a finite, non-zero gradient from a random projection of ``out``."""
    loss = sum((o * rand(*o.shape, seed=i + 1, dtype=o.dtype)).sum() for i, o in enumerate(out))
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, _), g in zip(params.items(), grads):
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"{name} has a zero or non-finite gradient"


def naive_mha(m, x, context):
    """Multi-head attention written out with ``m``'s weights (no pattern, H_kv = H): materialized softmax."""
    B, N, _ = x.shape
    M = context.shape[1]
    H, D = m.heads, m.head_dim
    w_k, w_v = m.kv_proj.weight.chunk(2)
    b_k, b_v = m.kv_proj.bias.chunk(2)
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    k = F.linear(context, w_k, b_k).view(B, M, H, D).transpose(1, 2)  # (B, H, M, D)
    v = F.linear(context, w_v, b_v).view(B, M, H, D).transpose(1, 2)  # (B, H, M, D)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)  # (B, H, N, M)
    return F.linear((p @ v).transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)


def mha_like(m, dim, heads):
    """A MultiHeadAttention holding ``m``'s projection weights."""
    ref = MultiHeadAttention(dim, heads).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("q_proj", "kv_proj", "out_proj")})
    return ref


# -------------------------------------------------------------------------------------------- multiscale_heads


def test_multiscale_heads_one_scale_is_mha():
    torch.manual_seed(0)
    m = MultiScaleHeads(16, 4, scales=1).double()
    x = rand(2, 25, 16)
    (y,) = m(x)
    torch.testing.assert_close(y, m.body(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads,scales,grid", [(4, 2, (4, 6)), (6, 3, (8, 4)), (4, 4, (8, 8))],
                         ids=lambda v: str(v))
def test_multiscale_heads_groups_are_pooled_slices_of_mha(heads, scales, grid):
    """Scale s = AvgPool_{2^s}(MHA with every other head group's output columns zeroed)."""
    torch.manual_seed(0)
    C = 2 * heads
    m = MultiScaleHeads(C, heads, scales=scales).double()
    h, w = grid
    x = rand(2, h * w, C)
    ys = m(x, grid=grid)
    G, D = heads // scales, m.body.head_dim
    for s, y in enumerate(ys):
        ref = mha_like(m.body, C, heads)
        with torch.no_grad():
            keep = torch.zeros(heads * D, dtype=torch.bool)
            keep[s * G * D:(s + 1) * G * D] = True
            ref.out_proj.weight[:, ~keep] = 0.0
        full = naive_mha(ref, x, x)  # (B, N, C)
        f = 2 ** s
        pooled = F.avg_pool2d(full.transpose(1, 2).reshape(2, C, h, w), f).flatten(2).transpose(1, 2)
        assert y.shape == (2, h * w // f ** 2, C)
        torch.testing.assert_close(y, pooled, rtol=1e-10, atol=1e-10)


def test_multiscale_heads_grads_and_errors():
    m = headwise.create("multiscale_heads", dim=16, heads=4)
    assert_all_params_get_grads(m, m(torch.randn(2, 16, 16)))
    with pytest.raises(ValueError, match="heads must be divisible by scales, got heads=4 scales=3"):
        MultiScaleHeads(16, 4, scales=3)
    with pytest.raises(ValueError, match="not a square grid"):
        m(torch.randn(1, 15, 16))
    with pytest.raises(ValueError, match=r"grid=\(3, 6\) must be divisible by 2\*\*\(scales-1\)=2"):
        m(torch.randn(1, 18, 16), grid=(3, 6))


# ---------------------------------------------------------------------------------------------- rollout, glca


def test_attention_rollout_by_hand():
    a1 = torch.softmax(rand(2, 3, 5, 5, seed=1), -1)
    a2 = torch.softmax(rand(2, 3, 5, 5, seed=2), -1)
    eye = torch.eye(5, dtype=F64)
    ref = (0.5 * a2.mean(1) + 0.5 * eye) @ (0.5 * a1.mean(1) + 0.5 * eye)
    torch.testing.assert_close(attention_rollout([a1, a2]), ref)
    torch.testing.assert_close(attention_rollout([a1, a2]).sum(-1), torch.ones(2, 5, dtype=F64))  # stays stochastic
    with pytest.raises(ValueError, match="at least one attention map"):
        attention_rollout([])


@pytest.mark.parametrize("N", [1, 17, 63], ids=lambda n: f"N{n}")
def test_glca_full_ratio_is_self_attention(N):
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(16, 4, local_ratio=1.0).double()
    x = rand(2, N, 16)
    out, idx = m(x, scores=rand(2, N, seed=4))
    back = torch.empty_like(out).scatter(1, idx[..., None].expand_as(out), out)  # original token order
    torch.testing.assert_close(back, naive_mha(m, x, x), rtol=1e-10, atol=1e-10)


def test_glca_selects_top_r_tokens_as_queries():
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(8, 2, local_ratio=0.2).double()
    x = rand(3, 21, 8)
    scores = rand(3, 21, seed=5)
    out, idx = m(x, scores=scores)
    R = math.ceil(0.2 * 21)
    assert idx.shape == (3, R) and out.shape == (3, R, 8)
    assert torch.equal(idx, scores.argsort(-1, descending=True)[:, :R])
    local = torch.stack([x[b, idx[b]] for b in range(3)])
    torch.testing.assert_close(out, naive_mha(m, local, x), rtol=1e-10, atol=1e-10)


def test_glca_default_scores_are_its_own_cls_rollout():
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(8, 2, local_ratio=0.5).double()
    x = rand(2, 9, 8)
    B, N, H, D = 2, 9, 2, 4
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)
    k = F.linear(x, m.kv_proj.weight[:8], m.kv_proj.bias[:8]).view(B, N, H, D).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)  # (B, H, N, N)
    expected = attention_rollout([a])[:, 0]  # (B, N) class-token row
    torch.testing.assert_close(m.cls_rollout(x), expected, rtol=1e-12, atol=1e-12)
    _, idx = m(x)
    assert torch.equal(idx, expected.topk(5, -1).indices)


def test_glca_grads_and_errors():
    m = headwise.create("glca(local_ratio=0.5)", dim=8, heads=2)
    out, _ = m(torch.randn(2, 10, 8))
    assert_all_params_get_grads(m, [out])
    with pytest.raises(ValueError, match=r"local_ratio must be a number in \(0, 1\], got local_ratio=0"):
        GlobalLocalCrossAttention(8, 2, local_ratio=0)
    with pytest.raises(ValueError, match=r"scores must be a tensor \[B, N\]"):
        m(torch.randn(2, 10, 8), scores=torch.rand(2, 9))


# ------------------------------------------------------------------------------------------------------ pwca


def test_pwca_without_pair_and_with_itself_is_self_attention():
    torch.manual_seed(0)
    m = PairwiseCrossAttention(16, 4).double()
    x = rand(2, 13, 16)
    ref = naive_mha(m, x, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, pair=x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("N,M", [(1, 1), (13, 7), (63, 64)], ids=lambda v: str(v))
def test_pwca_attends_to_concatenated_keys(N, M):
    torch.manual_seed(0)
    m = PairwiseCrossAttention(8, 2).double()
    x, pair = rand(2, N, 8), rand(2, M, 8, seed=1)
    out = m(x, pair=pair)
    torch.testing.assert_close(out, naive_mha(m, x, torch.cat([x, pair], 1)), rtol=1e-10, atol=1e-10)
    assert_all_params_get_grads(m, [out])


def test_pwca_bad_pair():
    with pytest.raises(ValueError, match=r"pair must be \[B, N, C\] with C = dim = 8"):
        PairwiseCrossAttention(8, 2)(torch.randn(2, 5, 8), pair=torch.randn(2, 5, 4))


# ----------------------------------------------------------------------------------------- dictionary_cross


@pytest.mark.parametrize("N,S", [(1, 1), (17, 32), (63, 5)], ids=lambda v: str(v))
def test_dictionary_cross_is_mha_to_the_dictionary(N, S):
    torch.manual_seed(0)
    m = DictionaryCrossAttention(16, 4, entries=S).double()
    x = rand(2, N, 16)
    ref = mha_like(m, 16, 4)
    torch.testing.assert_close(m(x), ref(x, m.dictionary.expand(2, S, 16)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x), naive_mha(m, x, m.dictionary.expand(2, S, 16)), rtol=1e-10, atol=1e-10)


def test_dictionary_cross_multiscale_list_and_grads():
    m = headwise.create("dictionary_cross(entries=8)", dim=8, heads=2)
    feats = [torch.randn(2, 64, 8), torch.randn(2, 16, 8), torch.randn(2, 4, 8)]
    outs = m(feats)
    assert [o.shape for o in outs] == [f.shape for f in feats]
    torch.testing.assert_close(outs[1], m(feats[1]))
    assert_all_params_get_grads(m, outs)
    with pytest.raises(ValueError, match="entries must be a positive int, got entries=0"):
        DictionaryCrossAttention(8, 2, entries=0)


# --------------------------------------------------------------------------------------------- mil_attention


def naive_gated_pooling(m, x, branch=0):
    """Ilse et al.'s gated attention pooling for one branch: a = softmax(w^T (tanh(V h) * sigm(U h))), z = a h."""
    g = torch.tanh(x @ m.V.weight.T + m.V.bias) * torch.sigmoid(x @ m.U.weight.T + m.U.bias)  # (B, N, L)
    a = torch.softmax(g @ m.w.weight[branch] + m.w.bias[branch], dim=-1)  # (B, N)
    return (a[..., None] * x).sum(1), a  # (B, C), (B, N)


@pytest.mark.parametrize("N", [1, 7, 500], ids=lambda n: f"N{n}")
def test_mil_one_branch_no_masking_is_gated_attention_pooling(N):
    torch.manual_seed(0)
    m = MILAttention(6, branches=1, hidden=5, mask_top_k=0).double().train()
    x = rand(2, N, 6)
    out = m(x)
    z, a = naive_gated_pooling(m, x)
    torch.testing.assert_close(out.bag, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.branches[:, 0], z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.attention[:, 0], a, rtol=1e-12, atol=1e-12)
    assert out.logits is None and out.branch_logits is None


def test_mil_branches_and_bag_are_the_branch_average():
    torch.manual_seed(0)
    m = MILAttention(6, branches=3, hidden=5).double().eval()  # eval: no masking
    x = rand(2, 11, 6)
    out = m(x)
    pooled = [naive_gated_pooling(m, x, b) for b in range(3)]
    for b, (z, a) in enumerate(pooled):
        torch.testing.assert_close(out.branches[:, b], z, rtol=1e-12, atol=1e-12)
    a_mean = torch.stack([a for _, a in pooled]).mean(0)  # (B, N)
    torch.testing.assert_close(out.bag, (a_mean[..., None] * x).sum(1), rtol=1e-12, atol=1e-12)


def test_mil_stochastic_top_k_masking():
    """Training: floor(k p) of each branch's top-k instances get zero attention, the others renormalize; the bag
    embedding still pools with the unmasked attention."""
    torch.manual_seed(0)
    m = MILAttention(6, branches=4, hidden=5, mask_top_k=5, mask_ratio=0.6).double().train()
    x = rand(3, 20, 6)
    out = m(x)
    s = m.scores(x)  # (B, M, N)
    top = s.topk(5, dim=-1).indices
    masked = out.attention == 0
    assert (masked.sum(-1) == 3).all()  # floor(5 * 0.6)
    assert torch.gather(masked, -1, top).sum(-1).eq(3).all()  # only among the top 5
    torch.testing.assert_close(out.attention, torch.softmax(s.masked_fill(masked, -math.inf), -1))
    torch.testing.assert_close(out.bag, m.eval()(x).bag)


def test_mil_never_masks_every_instance():
    m = MILAttention(4, branches=2, mask_top_k=10, mask_ratio=1.0).train()
    out = m(torch.randn(2, 3, 4))
    assert ((out.attention > 0).sum(-1) == 1).all()
    assert torch.isfinite(out.branches).all()


def test_mil_classifiers_grads_and_errors():
    m = headwise.create("mil_attention(classes=3, branches=2, mask_top_k=2)", dim=8).train()
    out = m(torch.randn(2, 9, 8))
    assert out.logits.shape == (2, 3) and out.branch_logits.shape == (2, 2, 3)
    assert_all_params_get_grads(m, [out.logits, out.branch_logits])
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\], got mask_ratio=1.5"):
        MILAttention(8, mask_ratio=1.5)
    with pytest.raises(ValueError, match="mask_top_k must be a non-negative int, got mask_top_k=-1"):
        MILAttention(8, mask_top_k=-1)
    with pytest.raises(ValueError, match=r"x must be a bag \[B, N, C\]"):
        m(torch.randn(9, 8))


# ------------------------------------------------------------------------------------------------- shared_kv


def naive_region_attention(m, x, ref, q_regions, k_regions):
    """Per query: softmax over the reference keys of its own region (its own pass's keys if there are none)."""
    B, N, _ = x.shape
    M = ref.shape[1]
    H, D = m.heads, m.head_dim
    w_k, w_v = m.kv_proj.weight.chunk(2)
    b_k, b_v = m.kv_proj.bias.chunk(2)
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    out = torch.zeros(B, H, N, D, dtype=x.dtype)
    for b in range(B):
        for i in range(N):
            same = k_regions[b] == q_regions[b, i]  # (M,)
            src, allowed = (ref[b], same) if same.any() else (x[b], torch.ones(N, dtype=torch.bool))
            k = F.linear(src, w_k, b_k).view(-1, H, D).transpose(0, 1)  # (H, M', D)
            v = F.linear(src, w_v, b_v).view(-1, H, D).transpose(0, 1)
            s = (q[b, :, i, None] @ k.transpose(-1, -2))[:, 0] / math.sqrt(D)  # (H, M')
            p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
            out[b, :, i] = (p[..., None] * v).sum(1)
    return F.linear(out.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)


def test_shared_kv_without_regions_is_cross_attention_to_the_reference():
    torch.manual_seed(0)
    m = SharedKVAttention(16, 4).double()
    x, ref = rand(2, 9, 16), rand(2, 11, 16, seed=1)
    torch.testing.assert_close(m(x, ref), naive_mha(m, x, ref), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x), naive_mha(m, x, x), rtol=1e-10, atol=1e-10)
    one = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 11, dtype=torch.long)
    torch.testing.assert_close(m(x, ref, query_regions=one[0], key_regions=one[1]), m(x, ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,M,R", [(1, 1, 1), (9, 11, 2), (20, 17, 3)], ids=lambda v: str(v))
def test_shared_kv_regions_match_masked_loop(N, M, R):
    torch.manual_seed(0)
    m = SharedKVAttention(8, 2).double()
    x, ref = rand(2, N, 8), rand(2, M, 8, seed=1)
    g = torch.Generator().manual_seed(3)
    q_regions = torch.randint(0, R + 1, (2, N), generator=g)  # label R may be absent from the reference
    k_regions = torch.randint(0, R, (2, M), generator=g)
    out = m(x, ref, query_regions=q_regions, key_regions=k_regions)
    torch.testing.assert_close(out, naive_region_attention(m, x, ref, q_regions, k_regions), rtol=1e-10, atol=1e-10)
    if M > 1:  # with a single key the softmax is constant and q_proj rightly gets no gradient
        assert_all_params_get_grads(m, [out])


def test_shared_kv_errors():
    m = SharedKVAttention(8, 2)
    x = torch.randn(2, 5, 8)
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="need a reference pass"):
        m(x, query_regions=labels, key_regions=labels)
    with pytest.raises(ValueError, match="pass both query_regions"):
        m(x, x, query_regions=labels)
    with pytest.raises(ValueError, match=r"key_regions must be an integer tensor \[B, M\] = \[2, 5\]"):
        m(x, x, query_regions=labels, key_regions=labels.float())


# --------------------------------------------------------------------------------------------- window_cross


def test_relative_position_index_counts_offsets():
    idx = relative_position_index(3)  # (9, 9)
    assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == 24
    assert (idx.diagonal() == 12).all()  # zero offset is the centre of the 5x5 table
    assert idx[0, 8] == 0 and idx[8, 0] == 24  # (0,0)-(2,2) = (-2,-2); (2,2)-(0,0) = (2,2)


@pytest.mark.parametrize("w,H,W,heads", [(1, 1, 1, 1), (3, 6, 9, 2), (4, 4, 8, 4)], ids=lambda v: str(v))
def test_window_cross_matches_window_loop(w, H, W, heads):
    torch.manual_seed(0)
    m = WindowCrossAttention(8, heads, window=w).double()
    with torch.no_grad():
        m.bias_table.normal_()
    x, q = rand(2, 8, H, W), rand(2, 8, w, w, seed=1)
    torch.testing.assert_close(m(x, q), naive_window_cross_attention(m, x, q), rtol=1e-10, atol=1e-10)


def test_window_cross_single_window_zero_bias_is_plain_cross_attention():
    """One window and a zero bias: softmax(Q K^T / sqrt(d)) V over all image tokens, Q the raw landmark tokens."""
    torch.manual_seed(0)
    m = WindowCrossAttention(8, 2, window=4).double()
    with torch.no_grad():
        m.bias_table.zero_()
    x, q = rand(2, 8, 4, 4), rand(2, 8, 4, 4, seed=1)
    t = F.layer_norm(x.flatten(2).transpose(1, 2), (8,), m.norm.weight, m.norm.bias)  # (B, 16, C)
    k, v = F.linear(t, m.kv_proj.weight, m.kv_proj.bias).view(2, 16, 2, 2, 4).permute(2, 0, 3, 1, 4)
    qh = q.flatten(2).transpose(1, 2).reshape(2, 16, 2, 4).transpose(1, 2)
    o = torch.softmax(qh @ k.transpose(-1, -2) / 2.0, -1) @ v  # (B, 2, 16, 4)
    ref = F.linear(o.transpose(1, 2).reshape(2, 16, 8), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(m(x, q), ref.transpose(1, 2).reshape(2, 8, 4, 4), rtol=1e-10, atol=1e-10)


def test_window_cross_grads_and_errors():
    m = headwise.create("window_cross(window=2)", dim=4, heads=2)
    out = m(torch.randn(2, 4, 4, 6), torch.randn(2, 4, 2, 2))
    assert_all_params_get_grads(m, [out])
    with pytest.raises(ValueError, match="H, W multiples of window=2"):
        m(torch.randn(2, 4, 5, 6), torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"queries must be \[B, C, w, w\] = \[2, 4, 2, 2\]"):
        m(torch.randn(2, 4, 4, 6), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="dim must be divisible by heads, got dim=6 heads=4"):
        WindowCrossAttention(6, 4)


def test_reliability_balance_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=F64)
    s = torch.tensor([[0.2, 0.7, 0.1]], dtype=F64)
    a = torch.tensor([[1 / 3, 1 / 3, 1 / 3]], dtype=F64)  # uniform: confidence 0, no weight
    p = torch.softmax(logits, -1)
    c = 1 + (p * p.log()).sum() / math.log(3)
    expected = 0.25 * p + 0.75 * (c * p + (1 - c) * s)  # r = s because a's confidence is 0
    torch.testing.assert_close(reliability_balance(logits, s, a, trust=0.75), expected)
    torch.testing.assert_close(reliability_balance(logits, s, a, trust=0.0), p)
    with pytest.raises(ValueError, match="trust must be in \\[0, 1\\], got trust=2"):
        reliability_balance(logits, s, a, trust=2)
    with pytest.raises(ValueError, match="anchor_similarity must have logits' shape"):
        reliability_balance(logits, s[:, :2], a, trust=0.5)
