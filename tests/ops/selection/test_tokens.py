"""Token/key selections against brute-force Python selections (same keys, ties to the lower index), the per-block
DMA selection against its dense reference, DCAL's and LSceneLLM's token selectors, and their errors."""

import itertools
import math
import re

import pytest
import torch

from headwise.ops.selection import tokens
from headwise.ops.selection.tokens import (
    attention_rollout,
    dense_token_select,
    dma_block_keep,
    dma_blocks,
    dma_key_rank,
    dma_mask,
    rollout_select,
    top_indices,
    topk_mask,
)

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tied(*shape, seed=0, levels=4):
    """Small integers as floats: many ties, so the tie rule is exercised."""
    return torch.randint(0, levels, shape, generator=gen(seed)).to(F64)


def brute_best(values, candidates, count):
    """The ``count`` best candidates by (value descending, index ascending)."""
    return sorted(candidates, key=lambda j: (-values[j], j))[:count]


# ---- top_indices / topk_mask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,count", [(1, 1), (7, 3), (9, 9), (5, 12)], ids=lambda v: str(v))
def test_top_indices_matches_brute_force(n, count):
    s = tied(3, 4, n, seed=n)
    got = top_indices(s, count)
    for b, h in itertools.product(range(3), range(4)):
        row = s[b, h].tolist()
        assert got[b, h].tolist() == brute_best(row, range(n), count)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (33, 8), (12, 12), (6, 20)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_allowed", [False, True], ids=["all", "allowed"])
def test_topk_mask_matches_brute_force(n, k, with_allowed):
    s = tied(2, 3, 5, n, seed=n + k)
    allowed = torch.rand(5, n, generator=gen(1)) < 0.6 if with_allowed else None
    got = topk_mask(s, k, allowed)
    for b, h, i in itertools.product(range(2), range(3), range(5)):
        cand = [j for j in range(n) if allowed is None or allowed[i, j]]
        expected = set(brute_best(s[b, h, i].tolist(), cand, k))
        assert set(torch.nonzero(got[b, h, i]).flatten().tolist()) == expected


def test_topk_mask_keeps_lowest_index_among_ties():
    s = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert topk_mask(s, 2).tolist() == [[False, True, True, False, False]]
    assert top_indices(s, 2).tolist() == [[1, 2]]


# ---- DMA ---------------------------------------------------------------------------------------------------------
def test_dma_key_rank_is_the_position_in_the_best_first_order():
    z = tied(2, 3, 11, seed=3)
    rank, order = dma_key_rank(z)
    for b, h in itertools.product(range(2), range(3)):
        best = brute_best(z[b, h].tolist(), range(11), 11)
        assert order[b, h].tolist() == best
        assert [rank[b, h, j].item() for j in best] == list(range(11))


@pytest.mark.parametrize("n,window", [(1, 1), (9, 1), (9, 4), (20, 7), (8, 8), (6, 30)], ids=lambda v: str(v))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dma_mask_matches_brute_force(n, window, causal):
    z = tied(2, 2, n, seed=n)
    got = dma_mask(z, n, window, causal)
    assert got.shape == (2, 2, n, n)
    for b, h, i in itertools.product(range(2), range(2), range(n)):
        cand = range(i + 1) if causal else range(n)
        expected = set(brute_best(z[b, h].tolist(), cand, window))
        assert set(torch.nonzero(got[b, h, i]).flatten().tolist()) == expected


def blocks_to_dense(z, window, block):
    """The dense mask the per-block selection describes (prefix slots -> their keys, own keys -> positions)."""
    B, H, N = z.shape
    sel = dma_blocks(z, window, block)
    nb = math.ceil(N / block)
    dense = torch.zeros(B, H, nb * block, N, dtype=torch.bool)
    n_prefix, keep_own = dma_block_keep(sel, 0, nb)  # (B, H, nb, Bq), (B, H, nb, Bq, Bq)
    for b, h, c, r in itertools.product(range(B), range(H), range(nb), range(block)):
        i = c * block + r
        for s in range(n_prefix[b, h, c, r].item()):
            key = sel.prefix[b, h, c, s].item()
            assert 0 <= key < c * block, "a kept prefix slot must hold a key before the block"
            dense[b, h, i, key] = True
        for s in torch.nonzero(keep_own[b, h, c, r]).flatten().tolist():
            assert c * block + s < N and s <= r
            dense[b, h, i, c * block + s] = True
    return dense[:, :, :N], dense[:, :, N:]


@pytest.mark.parametrize(
    "n,window,block",
    [(1, 1, 1), (1, 3, 4), (13, 1, 4), (13, 4, 4), (23, 5, 4), (23, 5, 1), (23, 6, 23), (30, 7, 64), (17, 40, 5),
     (40, 9, 3)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("compiled", [True, False], ids=["heap", "counting"])
def test_dma_blocks_equal_the_dense_selection(n, window, block, compiled, monkeypatch):
    if not compiled:  # the PyTorch path (no extension, other devices)
        monkeypatch.setattr(tokens, "_compiled", lambda z: None)
    z = tied(2, 2, n, seed=n + window, levels=3)
    dense, past_end = blocks_to_dense(z, window, block)
    assert torch.equal(dense, dma_mask(z, n, window, causal=True))
    if past_end.shape[2]:  # padded query rows repeat the last query's selection: never empty
        assert torch.equal(past_end, dense[:, :, -1:].expand_as(past_end))


def test_dma_blocks_with_distinct_bias_and_a_long_sequence():
    z = torch.randn(1, 2, 200, generator=gen(5), dtype=F64)
    dense, _ = blocks_to_dense(z, 17, 16)
    assert torch.equal(dense, dma_mask(z, 200, 17))


def test_dma_prefix_is_the_best_keys_before_each_block():
    z = tied(1, 1, 12, seed=2)
    sel = dma_blocks(z, 3, 4)
    for c in range(3):
        best = brute_best(z[0, 0].tolist(), range(4 * c), 3)
        assert sel.prefix[0, 0, c].tolist() == best + [-1] * (3 - len(best))


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: dma_mask(torch.zeros(1, 1, 4), 4, 0), ValueError, "window must be a positive int, got window=0"),
        (lambda: dma_mask(torch.zeros(1, 1, 4), 4, 2.0), TypeError, "window must be a positive int, got window=2.0"),
        (lambda: dma_mask(torch.zeros(1, 4), 4, 2), ValueError, "z must be a floating-point tensor [B, H, M]"),
        (lambda: dma_mask(torch.zeros(1, 1, 4), 3, 2), ValueError, "causal DMA selection needs as many queries as keys"),
        (lambda: dma_blocks(torch.zeros(1, 1, 4), 2, 0), ValueError, "block must be a positive int, got block=0"),
        (lambda: topk_mask(torch.zeros(3), 0), ValueError, "k must be a positive int, got k=0"),
        (lambda: top_indices(torch.zeros(3), True), TypeError, "count must be a positive int, got count=True"),
    ],
    ids=["window-0", "window-float", "z-2d", "causal-lengths", "block-0", "k-0", "count-bool"],
)
def test_bad_selection_arguments_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()


# ---- DCAL and LSceneLLM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio", [(1, 0.5), (10, 0.1), (21, 0.3), (8, 1.0)], ids=lambda v: str(v))
def test_rollout_select_is_the_top_ceil_ratio_tokens(n, ratio):
    scores = tied(3, n, seed=n)
    idx = rollout_select(scores, ratio)
    R = math.ceil(ratio * n)
    assert idx.shape == (3, R)
    for b in range(3):
        assert idx[b].tolist() == brute_best(scores[b].tolist(), range(n), R)


def test_rollout_select_on_a_rollout_picks_the_class_tokens_most_attended():
    maps = [torch.softmax(torch.randn(2, 3, 9, 9, generator=gen(s), dtype=F64), -1) for s in (1, 2)]
    cls_row = attention_rollout(maps)[:, 0]  # (B, N)
    idx = rollout_select(cls_row, 0.34)
    assert torch.equal(idx, cls_row.argsort(-1, descending=True)[:, :4])


def test_dense_token_select_matches_brute_force_with_masks():
    B, H, Nq, Nk = 2, 3, 5, 12
    attn = torch.softmax(torch.randn(B, H, Nq, Nk, generator=gen(7), dtype=F64), -1)
    qm = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    km = torch.ones(B, Nk, dtype=torch.bool)
    km[0, :4] = False  # element 0: 8 visual candidates, element 1: 12
    idx, mass = dense_token_select(attn, 0.25, query_mask=qm, key_mask=km)
    assert idx.shape == (B, 3)  # ceil(0.25 * 12)
    for b in range(B):
        rows = [i for i in range(Nq) if qm[b, i]]
        m = [sum(attn[b, h, i, j].item() for h in range(H) for i in rows) / (H * len(rows)) for j in range(Nk)]
        cand = [j for j in range(Nk) if km[b, j]]
        assert idx[b].tolist() == brute_best(m, cand, 3)
        torch.testing.assert_close(mass[b, km[b]], torch.tensor(m, dtype=F64)[km[b]])


def test_dense_token_select_defaults_and_padding():
    attn = torch.softmax(torch.randn(1, 4, 6, generator=gen(1), dtype=F64), -1)  # [B, N_q, N_k]
    idx, mass = dense_token_select(attn, 0.5)
    torch.testing.assert_close(mass, attn.mean(1))
    assert idx[0].tolist() == brute_best(mass[0].tolist(), range(6), 3)
    km = torch.tensor([[True, False, False, False, False, False], [True] * 6])
    idx, _ = dense_token_select(attn.expand(2, 4, 6), 0.5, key_mask=km)
    assert idx[0].tolist() == [0, -1, -1]  # one candidate; the other slots are padding


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: rollout_select(torch.zeros(2, 5), 0), "ratio must be a number in (0, 1], got ratio=0"),
        (lambda: rollout_select(torch.zeros(5), 0.5), "scores must be a tensor [B, N]"),
        (lambda: dense_token_select(torch.zeros(1, 2, 3), 1.5), "ratio must be a number in (0, 1], got ratio=1.5"),
        (lambda: dense_token_select(torch.zeros(2, 3), 0.5), "attn must be a floating-point tensor"),
        (lambda: dense_token_select(torch.zeros(1, 2, 3), 0.5, key_mask=torch.ones(1, 2, dtype=torch.bool)),
         "key_mask must be a bool tensor [B, 3]"),
    ],
    ids=["ratio-0", "scores-1d", "ratio-big", "attn-2d", "key-mask-shape"],
)
def test_bad_token_selector_arguments_raise_clear_errors(call, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        call()


@pytest.mark.slow
def test_dma_blocks_random_sweep():
    g = gen(123)
    for _ in range(40):
        n = int(torch.randint(1, 60, (1,), generator=g))
        window = int(torch.randint(1, n + 3, (1,), generator=g))
        block = int(torch.randint(1, n + 3, (1,), generator=g))
        z = torch.randint(0, 5, (1, 2, n), generator=g).to(F64)
        dense, _ = blocks_to_dense(z, window, block)
        assert torch.equal(dense, dma_mask(z, n, window)), (n, window, block)


def test_dma_thresholds_are_the_window_th_best_rank_so_far():
    z = tied(2, 3, 50, seed=9, levels=4)
    sel = dma_blocks(z, 7, 8)
    assert sel.threshold is not None, "the compiled extension is part of the test setup"
    for b, h, i in itertools.product(range(2), range(3), range(50)):
        seen = sorted(sel.rank[b, h, :i + 1].tolist())
        assert sel.threshold[b, h, i].item() == (50 if i + 1 < 7 else seen[6])
