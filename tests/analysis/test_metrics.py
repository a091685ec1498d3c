"""Per-head metrics with known answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.analysis import capture
from headwise.analysis import metrics as M


def one_hot_rows(cols: list[int], n_keys: int) -> torch.Tensor:
    """[len(cols), n_keys]: row i puts all attention on key cols[i]."""
    return F.one_hot(torch.tensor(cols), n_keys).double()


# ---- entropy, sinks -----------------------------------------------------------------------------------------


def sink_module() -> torch.nn.Module:
    """``mha`` (2 heads of 4) whose head 0 attends only to the token carrying feature 0 (token 0 below)."""
    m = headwise.create("mha", dim=8, heads=2).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.q_proj.bias[0] = 1.0  # head 0 query = e_0 for every token
        m.k_proj.weight[0, 0] = 200.0  # head 0 key dim 0 = 200 * feature 0
        m.out_proj.weight.fill_(0.1)
    return m


def test_sink_head_has_entropy_zero_and_is_flagged():
    m = sink_module()
    x = torch.randn(2, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, :, 0] = 0.0
    x[:, 0, 0] = 1.0  # token 0 is the only one with feature 0
    with torch.no_grad(), capture(m) as rec:
        m(x)
    p = rec.records[0].probs  # (B, H, N, N)
    ent = M.entropy(p)
    assert ent[0] < 1e-12  # one-hot rows
    assert abs(ent[1] - math.log(9)) < 1e-12  # head 1 has q = 0: uniform rows
    received, sink_head, tokens = M.attention_sinks(p)
    assert sink_head.tolist() == [True, False] and tokens == [[0], []]
    assert abs(received[0, 0] - 1) < 1e-12
    assert torch.allclose(M.token_attention(p, [0]), torch.tensor([1.0, 1 / 9], dtype=torch.float64))


def test_entropy_ignores_masked_rows():
    p = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    p[0, 0, 0] = 1 / 3
    assert abs(M.entropy(p)[0] - math.log(3) / 2) < 1e-15


def test_massive_activations():
    h = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(0))
    h[0, 2, 5] = 1e4
    assert M.massive_activations(h, ratio=100).tolist() == [[False, False, True, False, False, False]]


def test_target_ratio():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64).expand(1, 1, 2, 4)
    assert abs(M.target_ratio(p, targets=[0, 1], sinks=[0])[0] - 0.3 / 0.5) < 1e-15


# ---- distances -------------------------------------------------------------------------------------------


def test_previous_token_head_has_mean_distance_one():
    N = 11
    p = one_hot_rows([i - 1 for i in range(1, N)], N)[None, None]  # rows 1..N-1 attend to i - 1
    assert M.mean_distance(p, rows=torch.arange(1, N)).item() == 1.0
    prof = M.distance_profile(p, rows=torch.arange(1, N))
    assert prof[0, 1] == 1.0 and prof.sum() == 1.0


def test_mean_distance_on_a_grid_skips_the_class_token():
    grid = (3, 4)
    pos = M.token_positions(13, grid, prefix=1)  # token 0 = class token, then 3 x 4 patches
    N = 13
    cols = []
    for i in range(N):
        r, c = divmod(i - 1, 4)
        cols.append(0 if i == 0 else 1 + r * 4 + (c + 1) % 4)  # patch -> right neighbour (wrapping)
    p = one_hot_rows(cols, N)[None, None]
    # distances: 1 for c in 0..2, 3 for the wrap at c = 3 -> mean (3 * 1 + 3) / 4 = 1.5; the class row is skipped
    assert M.mean_distance(p, pos).item() == 1.5
    q = p.clone()
    q[0, 0, 1:, 0] = 0.5  # half of each patch row on the class token: renormalised over the patches
    q[0, 0, 1:] /= q[0, 0, 1:].sum(-1, keepdim=True)
    assert abs(M.mean_distance(q, pos).item() - 1.5) < 1e-12


def test_token_positions_errors():
    with pytest.raises(ValueError, match="grid"):
        M.token_positions(10, (3, 4), prefix=1)
    with pytest.raises(ValueError, match="prefix"):
        M.token_positions(3, None, prefix=4)


# ---- importance ------------------------------------------------------------------------------------------


def lm_loss(model):
    return lambda t: F.cross_entropy(model(t)[:, :-1].flatten(0, 1), t[:, 1:].flatten())


def test_zero_output_projection_gives_zero_pruning_importance(tiny_lm, tokens):
    with torch.no_grad():
        tiny_lm.blocks[1].attn.out_proj.weight[:, 2 * 8 : 3 * 8] = 0.0  # head 2 of layer 1 writes nothing
    imp = M.pruning_importance(tiny_lm, lm_loss(tiny_lm), [tokens])
    assert set(imp) == {"blocks.0.attn", "blocks.1.attn"}
    assert imp["blocks.1.attn"][2] == 0.0
    assert (imp["blocks.0.attn"] != 0).all()
    grad = M.gradient_importance(tiny_lm, lm_loss(tiny_lm), [tokens])
    assert grad["blocks.1.attn"][2] == 0.0 and (grad["blocks.0.attn"] > 0).all()


def test_gradient_importance_matches_finite_differences(tiny_lm, tokens):
    model = tiny_lm.double()
    loss = lm_loss(model)
    grad = M.gradient_importance(model, loss, [tokens])["blocks.0.attn"]
    from headwise.analysis.interventions import scale_heads

    eps = 1e-6
    for h in (0, 3):
        vals = []
        for s in (1 + eps, 1 - eps):
            g = torch.ones(4, dtype=torch.float64)
            g[h] = s
            with torch.no_grad(), scale_heads(model, {"blocks.0.attn": g}):
                vals.append(float(loss(tokens)))
        assert abs(abs(vals[0] - vals[1]) / (2 * eps) - grad[h]) < 1e-6


def test_gaam_importance_factor():
    torch.manual_seed(0)
    m = headwise.create("gaam(gaussians=2)", dim=16, heads=4)
    assert M.gaam_importance(m) == {}
    m(torch.randn(2, 5, 16))
    out = M.gaam_importance(m)[""]
    assert out["if"].shape == (5, 16) and out["per_head"].shape == (4,)
    assert out["if"].min() == 0 and out["if"].max() == 1
    torch.testing.assert_close(out["per_head"], m.importance_factor.view(5, 4, 4).mean((0, 2)))


def test_head_divergence_is_zero_for_a_segment_a_causal_head_cannot_see(tiny_lm, tokens):
    model = tiny_lm.double()  # shorter inputs change the matmul blocking: compare in float64
    after = M.head_divergence(model, model, tokens, slice(10, 16), queries=[5])
    assert all(d.max() < 1e-12 for d in after.values()) and len(after) == 2
    before = M.head_divergence(model, model, tokens, slice(1, 4), queries=[-1])
    assert all((d > 1e-3).all() for d in before.values())
    with pytest.raises(ValueError, match="queries"):
        M.head_divergence(tiny_lm, tiny_lm, tokens, slice(10, 16), queries=[-1])


# ---- rollout and flow ----------------------------------------------------------------------------------------


def test_rollout_of_identity_is_identity():
    eye = torch.eye(7, dtype=torch.float64).expand(2, 3, 7, 7)
    assert torch.equal(M.attention_rollout([eye, eye, eye]), torch.eye(7, dtype=torch.float64).expand(2, 7, 7))
    assert torch.allclose(M.attention_flow([eye, eye]), torch.eye(7, dtype=torch.float64).expand(2, 7, 7))


def test_rollout_is_the_product_of_residual_mixed_layers():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.softmax(torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64), -1) for _ in range(2))
    fuse = lambda x: 0.5 * x.mean(1) + 0.5 * torch.eye(5, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(M.attention_rollout([a, b]), fuse(b) @ fuse(a), rtol=1e-13, atol=1e-14)
    assert torch.allclose(M.attention_rollout([a, b]).sum(-1), torch.ones(1, 5, dtype=torch.float64))
    w = [torch.tensor([1.0, 0.0], dtype=torch.float64)] * 2  # head aggregation: only head 0
    fuse0 = lambda x: 0.5 * x[:, 0] + 0.5 * torch.eye(5, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(M.attention_rollout([a, b], head_weights=w), fuse0(b) @ fuse0(a))


def test_flow_through_one_layer_is_the_capacity():
    a = torch.softmax(torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    fused = 0.5 * a.mean(1) + 0.5 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(M.attention_flow([a], sources=[2, 5])[0], fused[0, [2, 5]], atol=1e-5, rtol=0)


def test_flow_is_bounded_by_the_rollout_path_capacities():
    g = torch.Generator().manual_seed(1)
    maps = [torch.softmax(torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    flow = M.attention_flow(maps, sources=[4])[0, 0]  # (N,)
    assert (flow > 0).all() and (flow <= 1 + 1e-5).all()


@pytest.mark.parametrize("bad", [[], [torch.zeros(1, 2, 3, 4)]], ids=["empty", "not-square"])
def test_rollout_bad_input(bad):
    with pytest.raises(ValueError):
        M.attention_rollout(bad)


# ---- KQ / OV circuits -----------------------------------------------------------------------------------------


def test_kq_ov_circuits_reproduce_scores_and_outputs():
    torch.manual_seed(0)
    m = headwise.create("gqa", dim=16, heads=4, kv_heads=2, qkv_bias=False, out_bias=False).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    kq, ov = M.kq_ov_circuits(m)
    q, k, v = m.project(x)
    torch.testing.assert_close(x[0] @ kq[3] @ x[0].T, q[0, 3] @ k[0, 1].T)  # head 3 reads kv head 1
    with capture(m) as rec:
        y = m(x)
    p = rec.records[0].probs[0]  # (H, N, N)
    torch.testing.assert_close(y[0], sum(p[h] @ x[0] @ ov[h].T for h in range(4)))


def test_icl_patterns_on_the_ideal_solution():
    H, C, d = 2, 6, 4
    kq = torch.zeros(H, C, C, dtype=torch.float64)
    kq[:, :d, :d] = 0.7 * torch.eye(d)  # diagonal and homogeneous
    ov = torch.zeros(H, C, C, dtype=torch.float64)
    ov[0, d, d], ov[1, d, d] = 2.0, -2.0  # last-entry-only, zero-sum
    out = M.icl_patterns(kq, ov, d)
    assert out["kq_diagonal"].tolist() == [1.0, 1.0] and out["kq_homogeneity"] == 0
    assert out["ov_last_entry"].tolist() == [1.0, 1.0] and out["ov_zero_sum"] == 0
    with pytest.raises(ValueError):
        M.icl_patterns(kq, ov, C)


def test_subsampled_rows_give_the_metrics_of_those_rows(tiny_lm, tokens):
    with capture(tiny_lm) as full, torch.no_grad():
        tiny_lm(tokens)
    with capture(tiny_lm, max_queries=5) as sub, torch.no_grad():
        tiny_lm(tokens)
    a, b = full.records[1], sub.records[1]
    rows = b.query_index
    torch.testing.assert_close(M.mean_distance(b.probs, rows=rows), M.mean_distance(a.probs[:, :, rows], rows=rows))
    torch.testing.assert_close(M.entropy(b.probs), M.entropy(a.probs[:, :, rows]))


@pytest.mark.parametrize("fn", [M.entropy, M.mean_distance, lambda p: M.token_attention(p, [0]),
                                lambda p: M.attention_sinks(p)], ids=["entropy", "distance", "tokens", "sinks"])
def test_metrics_reject_non_4d_probabilities(fn):
    with pytest.raises(ValueError, match=r"p must be attention probabilities \[B, H, n, M\]"):
        fn(torch.rand(3, 4, 4))
