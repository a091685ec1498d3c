"""Run-time block selection (headwise.core.selected) against the dense reference, forward and gradients."""

import math

import pytest
import torch

from headwise.core.selected import (
    block_select_attention, candidate_attention, candidate_mask, selection_mask, token_block_attention,
    token_selection_mask,
)
from headwise.patterns import Causal, SlidingWindow


def _brute_mask(kv_blocks, n_q, n_kv, block_q, block_kv, row_mask, pattern):
    B, H = kv_blocks.shape[:2]
    m = torch.zeros(B, H, n_q, n_kv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(n_q):
                for s, blk in enumerate(kv_blocks[b, h, i // block_q].tolist()):
                    if blk < 0 or (row_mask is not None and not row_mask[b, h, i // block_q, s, i % block_q]):
                        continue
                    for j in range(blk * block_kv, min((blk + 1) * block_kv, n_kv)):
                        m[b, h, i, j] = pattern is None or bool(pattern.mask(torch.tensor(i), torch.tensor(j)))
    return m


def _inputs(B, H, Hkv, N, M, D, block_q, block_kv, S, with_rows, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, M, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, M, D + 1, generator=g, dtype=dtype, requires_grad=True)
    kv_blocks = torch.randint(-1, math.ceil(M / block_kv), (B, H, math.ceil(N / block_q), S), generator=g)
    rows = torch.rand(B, H, math.ceil(N / block_q), S, block_q, generator=g) < 0.5 if with_rows else None
    return q, k, v, kv_blocks, rows


@pytest.mark.parametrize("rows", [False, True], ids=["block-major", "row-major"])
@pytest.mark.parametrize("pattern", [None, Causal()], ids=["full", "causal"])
def test_selection_mask_matches_brute_force(rows, pattern):
    _, _, _, kb, rm = _inputs(2, 2, 1, 13, 11, 4, 4, 3, 3, rows)
    got = selection_mask(kb, 13, 11, block_q=4, block_kv=3, row_mask=rm, pattern=pattern)
    assert torch.equal(got, _brute_mask(kb, 13, 11, 4, 3, rm, pattern))


CASES = [  # B, H, Hkv, N, M, D, block_q, block_kv, S
    (1, 1, 1, 1, 1, 4, 1, 1, 1),
    (1, 2, 1, 63, 63, 8, 16, 8, 3),
    (2, 2, 2, 500, 500, 8, 64, 32, 4),
    (1, 2, 2, 130, 700, 8, 100, 600, 2),  # key blocks larger than one engine tile
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Hkv{}-N{}-M{}-D{}-bq{}-bkv{}-S{}".format(*c))
@pytest.mark.parametrize("rows", [False, True], ids=["block-major", "row-major"])
@pytest.mark.parametrize("pattern", [None, Causal(), SlidingWindow(20)], ids=["full", "causal", "window"])
def test_engine_matches_reference(case, rows, pattern):
    if isinstance(pattern, SlidingWindow) and case[3] != case[4]:
        pytest.skip("window case on square shapes only")
    q, k, v, kb, rm = _inputs(*case, with_rows=rows)
    _assert_backends_agree(lambda backend: block_select_attention(
        q, k, v, kb, block_q=case[6], block_kv=case[7], row_mask=rm, pattern=pattern, return_lse=True,
        backend=backend), q, k, v)


def _assert_backends_agree(call, q, k, v):
    """``call(backend) -> (out, lse)``: the engine equals the reference, forward and gradients (lse included)."""
    results = []
    for backend in ("reference", "blocksparse"):
        out, lse = call(backend)
        assert not out.isnan().any()
        g = torch.Generator().manual_seed(1)
        w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
        w_lse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
        finite = torch.isfinite(lse)
        loss = (out * w_out).sum() + (lse.masked_fill(~finite, 0) * w_lse).sum()
        results.append((out, lse, torch.autograd.grad(loss, (q, k, v))))
    (o1, l1, g1), (o2, l2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-10)
    assert torch.equal(torch.isinf(l1), torch.isinf(l2))
    torch.testing.assert_close(l2.masked_fill(torch.isinf(l2), 0), l1.masked_fill(torch.isinf(l1), 0), rtol=0, atol=1e-10)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_rows_without_keys_are_zero():
    q, k, v, kb, _ = _inputs(1, 2, 2, 40, 40, 8, 8, 8, 2, False)
    kb[:, :, ::2] = -1  # every other query block selects nothing
    out, lse = block_select_attention(q, k, v, kb, block_q=8, block_kv=8, return_lse=True, backend="blocksparse")
    dead = torch.arange(40) // 8 % 2 == 0
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all()


def test_all_blocks_selected_is_full_and_causal_attention():
    import headwise

    q, k, v, _, _ = _inputs(1, 2, 2, 70, 70, 8, 16, 16, 1, False)
    kb = torch.arange(5).expand(1, 2, 5, 5).contiguous()
    for pattern in (None, Causal()):
        out = block_select_attention(q, k, v, kb, block_q=16, block_kv=16, pattern=pattern)
        ref = headwise.attention(q, k, v, pattern, backend="reference")
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_float32_close_to_float64():
    q, k, v, kb, rm = _inputs(1, 2, 2, 200, 200, 16, 32, 32, 3, True, dtype=torch.float32)
    out = block_select_attention(q, k, v, kb, block_q=32, block_kv=32, row_mask=rm, pattern=Causal())
    ref = block_select_attention(q.double(), k.double(), v.double(), kb, block_q=32, block_kv=32, row_mask=rm,
                                 pattern=Causal(), backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=0), "block_q"),
    (dict(block_kv=2.5), "block_kv"),
    (dict(kv_blocks=torch.zeros(1, 1, 3, 1, dtype=torch.long)), "query blocks"),
    (dict(kv_blocks=torch.full((1, 1, 2, 1), 9)), "kv_blocks values"),
    (dict(kv_blocks=torch.zeros(1, 1, 2, 1)), "int64"),
    (dict(row_mask=torch.ones(1, 1, 2, 1, 3, dtype=torch.bool)), "row_mask"),
    (dict(backend="dense"), "backend"),
])
def test_bad_input_names_the_argument(kwargs, match):
    q = k = v = torch.randn(1, 1, 8, 4)
    args = dict(kv_blocks=torch.zeros(1, 1, 2, 1, dtype=torch.long), block_q=4, block_kv=4)
    args.update(kwargs)
    kb = args.pop("kv_blocks")
    with pytest.raises((ValueError, TypeError), match=match):
        block_select_attention(q, k, v, kb, **args)


def test_head_specific_pattern_on_the_chunked_path():
    from headwise.patterns import PerHead

    q, k, v, kb, rm = _inputs(1, 2, 2, 50, 50, 8, 8, 8, 3, True)
    pattern = PerHead([SlidingWindow(3), Causal()])
    ref = block_select_attention(q, k, v, kb, block_q=8, block_kv=8, row_mask=rm, pattern=pattern, backend="reference")
    out = block_select_attention(q, k, v, kb, block_q=8, block_kv=8, row_mask=rm, pattern=pattern)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


# ---- per-query block selections (token_block_attention) ------------------------------------------------
def _token_inputs(B, H, Hkv, N, M, D, block_kv, density, seed=0, dtype=torch.float64):
    q, k, v, _, _ = _inputs(B, H, Hkv, N, M, D, 1, block_kv, 1, False, seed, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    sel = torch.rand(B, H, N, math.ceil(M / block_kv), generator=g) < density
    return q, k, v, sel


def test_token_selection_mask_matches_brute_force():
    _, _, _, sel = _token_inputs(2, 2, 1, 13, 11, 4, 3, 0.4)
    for pattern in (None, Causal()):
        want = torch.zeros(2, 2, 13, 11, dtype=torch.bool)
        for i in range(13):
            for j in range(11):
                want[:, :, i, j] = sel[:, :, i, j // 3] & (pattern is None or j <= i)
        assert torch.equal(token_selection_mask(sel, 11, block_kv=3, pattern=pattern), want)


TOKEN_CASES = [  # B, H, Hkv, N, M, D, block_kv, density
    (1, 1, 1, 1, 1, 4, 1, 1.0),
    (1, 2, 1, 63, 63, 8, 8, 0.3),
    (2, 2, 2, 500, 500, 8, 32, 0.2),
    (1, 2, 2, 130, 700, 8, 600, 0.7),  # key blocks larger than one engine tile
    (1, 2, 2, 100, 100, 8, 16, 0.0),  # nothing selected: zeros
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: "B{}-H{}-Hkv{}-N{}-M{}-D{}-bkv{}-p{}".format(*c))
@pytest.mark.parametrize("pattern", [None, Causal(), SlidingWindow(20)], ids=["full", "causal", "window"])
def test_token_engine_matches_reference(case, pattern):
    if not isinstance(pattern, type(None)) and case[3] != case[4]:
        pytest.skip("patterns on square shapes only")
    q, k, v, sel = _token_inputs(*case)
    _assert_backends_agree(lambda backend: token_block_attention(
        q, k, v, sel, block_kv=case[6], pattern=pattern, return_lse=True, backend=backend), q, k, v)


def test_token_engine_takes_the_block_major_view_and_equals_block_select():
    q, k, v, sel = _token_inputs(1, 2, 2, 96, 96, 8, 16, 0.4)
    view = sel.transpose(-1, -2).contiguous().transpose(-1, -2)  # [B, H, blocks, N] storage
    out = token_block_attention(q, k, v, view, block_kv=16, pattern=Causal())
    kb = torch.arange(6).expand(1, 2, 6, 6).contiguous()  # every query block lists every key block ...
    rows = sel.view(1, 2, 6, 16, 6).permute(0, 1, 2, 4, 3).contiguous()  # ... and its rows say which
    ref = block_select_attention(q, k, v, kb, block_q=16, block_kv=16, row_mask=rows, pattern=Causal())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_kv=0), "block_kv"),
    (dict(sel=torch.ones(1, 1, 8, 3, dtype=torch.bool)), "sel.shape"),
    (dict(sel=torch.ones(1, 1, 8, 2)), "bool"),
    (dict(pattern="causal"), "pattern"),
    (dict(backend="dense"), "backend"),
])
def test_token_bad_input_names_the_argument(kwargs, match):
    q = k = v = torch.randn(1, 1, 8, 4)
    args = dict(sel=torch.ones(1, 1, 8, 2, dtype=torch.bool), block_kv=4)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        token_block_attention(q, k, v, args.pop("sel"), **args)


# ---- own block + gathered far keys (candidate_attention) ------------------------------------------------
def _candidate_inputs(B, H, N, D, block, W, seed=0, dtype=torch.float64):
    q, k, v, _, _ = _inputs(B, H, H, N, N, D, 1, 1, 1, False, seed, dtype)
    g = torch.Generator().manual_seed(seed + 7)
    nb = math.ceil(N / block)
    starts = torch.arange(nb) * block
    extra = torch.full((B, H, nb, W), -1, dtype=torch.long)
    for c in range(nb):  # distinct keys before the block (far keys), random order
        before = int(starts[c])
        for b in range(B):
            for h in range(H):
                ids = torch.randperm(before, generator=g)[:W] if before else torch.empty(0, dtype=torch.long)
                extra[b, h, c, :len(ids)] = ids
    avail = (extra >= 0).sum(-1).repeat_interleave(block, dim=2)[:, :, :N]  # (B, H, N)
    n_extra = (torch.rand(B, H, N, generator=g) * (avail + 1)).long().clamp(max=avail)
    own = torch.rand(B, H, nb, block, block, generator=g) < 0.5
    own &= torch.ones(block, block, dtype=torch.bool).tril()
    return q, k, v, extra, n_extra, own


def test_candidate_mask_matches_brute_force():
    _, _, _, extra, n_extra, own = _candidate_inputs(1, 2, 13, 4, 4, 3)
    got = candidate_mask(extra, n_extra, own, 13, block=4)
    want = torch.zeros(1, 2, 13, 13, dtype=torch.bool)
    for h in range(2):
        for i in range(13):
            c, r = divmod(i, 4)
            for s in range(int(n_extra[0, h, i])):
                want[0, h, i, extra[0, h, c, s]] = True
            for j in range(4):
                if c * 4 + j < 13 and own[0, h, c, r, j]:
                    want[0, h, i, c * 4 + j] = True
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", [(1, 1, 1, 4, 1, 1), (1, 2, 63, 8, 16, 20), (2, 2, 500, 8, 64, 100),
                                  (1, 2, 700, 8, 128, 600), (1, 1, 100, 8, 32, 0)],
                         ids=lambda c: "B{}-H{}-N{}-D{}-block{}-W{}".format(*c))
def test_candidate_engine_matches_reference(case):
    q, k, v, extra, n_extra, own = _candidate_inputs(*case)
    _assert_backends_agree(lambda backend: candidate_attention(
        q, k, v, extra, n_extra, own, block=case[4], return_lse=True, backend=backend), q, k, v)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block=0), "block"),
    (dict(extra=torch.zeros(1, 1, 3, 2, dtype=torch.long)), "extra"),
    (dict(n_extra=torch.full((1, 1, 8), 3)), "n_extra values"),
    (dict(n_extra=torch.zeros(1, 1, 8)), "n_extra must"),
    (dict(own_mask=torch.ones(1, 1, 2, 4, 3, dtype=torch.bool)), "own_mask"),
    (dict(extra=torch.full((1, 1, 2, 2), 9)), "key ids"),
    (dict(extra=torch.full((1, 1, 2, 2), -1)), "not -1"),
])
def test_candidate_bad_input_names_the_argument(kwargs, match):
    q = k = v = torch.randn(1, 1, 8, 4)
    args = dict(extra=torch.zeros(1, 1, 2, 2, dtype=torch.long), n_extra=torch.ones(1, 1, 8, dtype=torch.long),
                own_mask=torch.ones(1, 1, 2, 4, 4, dtype=torch.bool), block=4)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        candidate_attention(q, k, v, args.pop("extra"), args.pop("n_extra"), args.pop("own_mask"), **args)
