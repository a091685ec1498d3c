"""Pattern base: Full, Causal(offset), Union, Intersection, PerHead, the exhaustive schedule and its helpers."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.patterns import (
    Causal,
    Full,
    Intersection,
    KeyMask,
    Neighborhood,
    PerHead,
    Segments,
    SlidingWindow,
    Union,
)
from headwise.patterns.base import interval_tile_ranges, schedule_from_states

# the schedule_exact fixture is a pure function, safe to share across examples
HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- Full and Causal ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_q, n_kv, tile_q, tile_kv", [(1, 1, 64, 64), (63, 17, 8, 5), (100, 130, 64, 32)],
                         ids=["N1", "Nq63-Nkv17-T8x5", "Nq100-Nkv130-T64x32"])
def test_full(n_q, n_kv, tile_q, tile_kv, schedule_exact):
    p = Full()
    assert p.dense_mask(n_q, n_kv).shape == (1, n_q, n_kv) and p.dense_mask(n_q, n_kv).all()
    assert p.density(n_q, n_kv) == 1.0
    sched = p.tile_schedule(n_q, n_kv, tile_q, tile_kv)
    assert sched.full[sched.visited].all() and sched.visited.all()
    assert sched.computed_pairs() == n_q * n_kv
    schedule_exact(p, sched)


def test_causal_hand_example():
    # 4 queries, 3 keys, offset 0: query i sees keys j <= i (query 3 sees all three)
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(Causal().dense_mask(4, 3)[0], expected)
    # bottom-right aligned for decoding 2 new queries against 5 keys: offset = 5 - 2
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(Causal(offset=3).dense_mask(2, 5)[0], expected)
    # negative offset: the first two queries see nothing
    assert Causal(offset=-2).dense_mask(4, 4)[0].sum(1).tolist() == [0, 0, 1, 2]


@HYPOTHESIS
@given(n_q=st.integers(1, 90), n_kv=st.integers(1, 90), offset=st.integers(-100, 100),
       tile_q=st.integers(1, 20), tile_kv=st.integers(1, 20))
def test_causal_schedule_and_density(n_q, n_kv, offset, tile_q, tile_kv, schedule_exact):
    p = Causal(offset)
    schedule_exact(p, p.tile_schedule(n_q, n_kv, tile_q, tile_kv))
    assert p.density(n_q, n_kv) == pytest.approx(p.dense_mask(n_q, n_kv).double().mean().item(), abs=1e-15)


def test_causal_rejects_non_int_offset():
    with pytest.raises(TypeError, match="offset"):
        Causal(offset=1.5)


def test_sequence_lengths_must_be_positive():
    with pytest.raises(ValueError, match="n_q=0"):
        Full().check(0, 3)


@pytest.mark.parametrize("tile_q, tile_kv, name", [(0, 4, "tile_q"), (4, -1, "tile_kv"), (2.5, 4, "tile_q")])
def test_bad_tiles(tile_q, tile_kv, name):
    with pytest.raises(ValueError, match=name):
        Causal().tile_schedule(8, 8, tile_q, tile_kv)


# ---- the exhaustive schedule and TileSchedule -------------------------------------------------------------------
def test_exhaustive_schedule_hand_example():
    # causal 4 x 4 in tiles of 2: tile (0, 0) partial, (0, 1) empty, (1, 0) full, (1, 1) partial
    s = Causal().exhaustive_schedule(4, 4, 2, 2)
    assert s.tile_states().tolist() == [[1, 0], [2, 1]]
    assert s.kv_tiles.tolist() == [[0, -1], [0, 1]]
    assert s.full.tolist() == [[False, False], [True, False]]
    assert s.computed_pairs() == 2 * 2 + 2 * 4
    # reversed token order: permuted query p is token 3 - p, so the first query tile holds tokens 3 and 2
    rev = torch.arange(3, -1, -1)
    s = Causal().exhaustive_schedule(4, 4, 2, 2, q_perm=rev, kv_perm=rev)
    assert s.tile_states().tolist() == [[1, 2], [0, 1]]


def test_exhaustive_schedule_uneven_bounds():
    # tiles of sizes 1, 3 (queries) and 3, 1 (keys) on a 4 x 4 causal mask
    s = Causal().exhaustive_schedule(4, 4, q_bounds=torch.tensor([0, 1, 4]), kv_bounds=torch.tensor([0, 3, 4]))
    assert s.tile_states().tolist() == [[1, 0], [1, 1]]


def test_exhaustive_schedule_bounded_memory_rows():
    # more rows than one block of the bounded-memory loop (2**23 // n_kv rows per block)
    n_q, n_kv = 300, 40000
    s = Causal(offset=-100).exhaustive_schedule(n_q, n_kv, 64, 4096)
    ref = Causal(offset=-100).tile_schedule(n_q, n_kv, 64, 4096)
    assert torch.equal(s.tile_states(), ref.tile_states())


def test_schedule_from_states():
    states = torch.tensor([[0, 2, 1], [0, 0, 0], [1, 0, 2]], dtype=torch.int8)
    bounds = torch.tensor([0, 2, 4, 6])
    s = schedule_from_states(6, 6, bounds, bounds, states)
    assert s.kv_tiles.tolist() == [[1, 2], [-1, -1], [0, 2]]
    assert s.full.tolist() == [[True, False], [False, False], [False, True]]
    assert torch.equal(s.tile_states(), states)


@pytest.mark.parametrize(
    "length, box, union, common, expected",
    [
        (10, 4, (-3, 5), (2, 3), (0, 1, 1, 0)),  # union meets tiles 0, 1; no whole tile inside [2, 3]
        (10, 4, (3, 12), (4, 11), (0, 2, 1, 2)),  # common covers tiles 1 and the short last tile 2 (keys 8, 9)
        (10, 4, (10, 14), (10, 14), (2, -1, 3, 2)),  # beyond the keys: nothing visited
        (10, 4, (0, 9), (5, 4), (0, 2, 2, 0)),  # empty intersection: no full tile
    ],
    ids=["left-border", "right-border-short-tile", "beyond-keys", "empty-common"],
)
def test_interval_tile_ranges(length, box, union, common, expected):
    bounds = [torch.tensor([x]) for x in (*union, *common)]
    assert tuple(int(r) for r in interval_tile_ranges(length, box, *bounds)) == expected


# ---- composition ---------------------------------------------------------------------------------------------
N = 36
PARTS = {
    "causal": Causal(),
    "window": SlidingWindow(3),
    "neighborhood": Neighborhood((6, 6), 3, dilation=(1, 2)),
    "segments": Segments([i // 7 for i in range(N)]),
    "keymask": KeyMask([i % 5 != 0 for i in range(N)]),
}


@pytest.mark.parametrize("a, b", [("causal", "window"), ("neighborhood", "segments"), ("window", "keymask"),
                                  ("neighborhood", "keymask")], ids=lambda x: x)
def test_union_and_intersection(a, b, schedule_exact):
    p, q = PARTS[a], PARTS[b]
    mp, mq = p.dense_mask(N, N), q.dense_mask(N, N)
    assert torch.equal((p | q).dense_mask(N, N), mp | mq)
    assert torch.equal((p & q).dense_mask(N, N), mp & mq)
    assert (p & q).density(N, N) == pytest.approx((mp & mq).double().mean().item(), abs=1e-15)
    schedule_exact(p | q, (p | q).tile_schedule(N, N, 8, 8))
    schedule_exact(p & q, (p & q).tile_schedule(N, N, 8, 8))


def test_combined_flattens_and_compares():
    a, b, c = Causal(), SlidingWindow(2), Full()
    u = a | b | c
    assert isinstance(u, Union) and u.parts == (a, b, c)
    assert isinstance(a & b & c, Intersection) and len((a & b & c).parts) == 3
    assert u == Union(a, b, c) and hash(u) == hash(Union(a, b, c))
    assert repr(a & b) == "(Causal(offset=0) & SlidingWindow(window=2, causal=False))"
    with pytest.raises(TypeError, match="int"):
        Causal() | 3


def test_combined_checks_every_part():
    with pytest.raises(ValueError, match="grid"):
        (Causal() | Neighborhood((4, 4), 3)).dense_mask(15, 15)


def test_per_head(schedule_exact):
    heads = [PARTS["causal"], PARTS["neighborhood"], PARTS["segments"]]
    p = PerHead(heads)
    m = p.dense_mask(N, N)
    assert m.shape == (3, N, N)
    for h, part in enumerate(heads):
        assert torch.equal(m[h], part.dense_mask(N, N)[0])
        assert torch.equal(p.mask(torch.arange(N)[:, None], torch.arange(N)[None, :], h), m[h])
        sched = p.tile_schedule(N, N, 8, 8, head=h)
        schedule_exact(p, sched, head=h)
    assert p.density(N, N) == pytest.approx(m.double().mean().item(), abs=1e-15)
    # heads broadcast as a tensor, as FlexAttention passes them
    h = torch.tensor([2, 0])[:, None, None]
    assert torch.equal(p.mask(torch.arange(N)[None, :, None], torch.arange(N)[None, None, :], h), m[[2, 0]])
    # composed with a head-agnostic pattern
    both = p & PARTS["keymask"]
    assert both.heads == 3 and torch.equal(both.dense_mask(N, N), m & PARTS["keymask"].dense_mask(N, N))


@pytest.mark.parametrize(
    "build, error, fragment",
    [
        (lambda: PerHead([]), ValueError, "patterns=\\[\\]"),
        (lambda: PerHead([Causal(), 3]), TypeError, "patterns\\[1\\]"),
        (lambda: PerHead([PerHead([Causal()])]), ValueError, "nest"),
        (lambda: PerHead([Causal()]).mask(torch.tensor(0), torch.tensor(0)), ValueError, "head="),
        (lambda: PerHead([Causal()]).mask(torch.tensor(0), torch.tensor(0), 1), ValueError, "head=1"),
        (lambda: PerHead([Causal()]).tile_schedule(4, 4), ValueError, "head="),
        (lambda: PerHead([Causal()]) | PerHead([Causal(), Full()]), ValueError, "number of heads"),
    ],
    ids=["empty", "not-a-pattern", "nested", "mask-no-head", "head-out-of-range", "schedule-no-head", "head-mismatch"],
)
def test_per_head_errors(build, error, fragment):
    with pytest.raises(error, match=fragment):
        build()


def test_mask_mod_closure():
    p = SlidingWindow(1)
    mod = p.mask_mod()
    assert mod(0, 0, torch.tensor(3), torch.tensor(4)).item() and not mod(0, 0, torch.tensor(3), torch.tensor(5)).item()


@pytest.mark.parametrize("name", PARTS)
def test_mask_mod_runs_under_vmap(name):
    """FlexAttention evaluates ``mask_mod`` on scalar index tensors under nested ``torch.vmap``."""
    p = PARTS[name]
    mod = torch.vmap(torch.vmap(p.mask_mod(), in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None))
    got = mod(torch.tensor(0), torch.tensor(0), torch.arange(N), torch.arange(N))  # (N, N)
    assert torch.equal(got, p.dense_mask(N, N)[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: Neighborhood((12, 10), 5) & KeyMask(torch.arange(120) % 7 != 3),
        lambda: KeyMask(torch.arange(120) < 90) & SlidingWindow(9, causal=True),
        lambda: Neighborhood((120,), 17, dilation=2) & Causal() & KeyMask(torch.arange(120) % 11 != 0),
    ],
    ids=["nbhd2d-keymask", "keymask-first", "three-parts"],
)
def test_intersection_schedule_is_exact(make):
    p = make()
    s = p.tile_schedule(120, 120, 16, 16)
    ref = p.exhaustive_schedule(120, 120, q_bounds=s.q_bounds, kv_bounds=s.kv_bounds, q_perm=s.q_perm,
                                kv_perm=s.kv_perm)
    assert torch.equal(s.tile_states(), ref.tile_states())
