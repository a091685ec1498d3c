"""The tile simulator against brute-force counts over the dense mask, and hand-worked cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.patterns import Causal, Full, Neighborhood, PerHead, blocked
from headwise.simulate.tiles import row_major_box, row_major_schedule, simulate_pattern


def brute_counts(mask: torch.Tensor, q_bounds: torch.Tensor, kv_bounds: torch.Tensor) -> dict[str, int]:
    """Visited / full tiles and computed pairs of a ``(N_q, N_kv)`` mask (in tile order), by summed-area table."""
    area = torch.zeros(mask.shape[0] + 1, mask.shape[1] + 1, dtype=torch.long)
    area[1:, 1:] = mask.long().cumsum(0).cumsum(1)
    q0, q1 = q_bounds[:-1, None], q_bounds[1:, None]
    k0, k1 = kv_bounds[None, :-1], kv_bounds[None, 1:]
    attended = area[q1, k1] - area[q0, k1] - area[q1, k0] + area[q0, k0]  # (n_q_tiles, n_kv_tiles)
    size = (q1 - q0) * (k1 - k0)
    visited = attended > 0
    return {"visited": int(visited.sum()), "full": int((attended == size).sum()),
            "computed_pairs": int(size[visited].sum()), "tiles": visited.numel()}


def uniform(n: int, tile: int) -> torch.Tensor:
    return torch.tensor(list(range(0, n, tile)) + [n])


@st.composite
def neighborhoods(draw):
    ndim = draw(st.integers(1, 3))
    grid, kernel, stride, dilation, causal = [], [], [], [], []
    for _ in range(ndim):
        size = draw(st.integers(2, 24 if ndim == 1 else 9 if ndim == 2 else 5))
        d = draw(st.integers(1, max(1, size // 2)))
        k = draw(st.integers(1, size // d))
        grid.append(size), dilation.append(d), kernel.append(k)
        stride.append(draw(st.integers(1, k)))
        causal.append(draw(st.booleans()))
    return Neighborhood(tuple(grid), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal))


@settings(max_examples=100, deadline=None)
@given(pattern=neighborhoods(), tile_q=st.integers(1, 20), tile_kv=st.integers(1, 20), data=st.data())
def test_counts_equal_brute_force_over_dense_mask(pattern, tile_q, tile_kv, data):
    n = pattern.n
    heads = data.draw(st.integers(1, 3), label="heads")
    sim = simulate_pattern(pattern, batch=2, heads=heads, head_dim=3, tile=(tile_q, tile_kv))
    mask = pattern.dense_mask(n, n)[0]  # (N, N)
    assert sim.attended_pairs == heads * int(mask.sum())
    assert sim.dense_flops == 4 * 2 * heads * n * n * 3
    assert sim.pattern_flops == 4 * 2 * 3 * sim.attended_pairs

    row_major = sim.schedule("row-major")
    truth = brute_counts(mask, uniform(n, tile_q), uniform(n, tile_kv))
    got = {k: getattr(row_major, k) for k in truth}
    assert got == {k: heads * v for k, v in truth.items()}
    assert not row_major.permuted

    own = pattern.tile_schedule(n, n, tile_q, tile_kv)
    perm_q = torch.arange(n) if own.q_perm is None else own.q_perm
    perm_kv = torch.arange(n) if own.kv_perm is None else own.kv_perm
    truth = brute_counts(mask[perm_q][:, perm_kv], own.q_bounds, own.kv_bounds)
    stats = sim.schedule("pattern")
    assert {k: getattr(stats, k) for k in truth} == {k: heads * v for k, v in truth.items()}

    for s in sim.schedules:
        assert s.tile_flops == 4 * 2 * 3 * s.computed_pairs
        assert 1.0 <= s.upper_bound <= sim.ideal_speedup * (1 + 1e-12)
        assert s.upper_bound == pytest.approx(sim.dense_flops / s.tile_flops, rel=0, abs=0)


@pytest.mark.parametrize("grid, tile, box", [
    ((8, 12), 4, (1, 4)), ((8, 12), 24, (2, 12)), ((8, 12), 12, (1, 12)), ((4, 6, 8), 16, (1, 2, 8)),
    ((8, 12), 5, None), ((8, 12), 36, None), ((30,), 7, None), ((30,), 10, (10,)),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_row_major_box(grid, tile, box):
    assert row_major_box(grid, tile) == box


@pytest.mark.parametrize("grid, kernel, tile", [
    ((8, 12), (3, 5), 4), ((8, 12), (3, 5), 24), ((4, 6, 8), (3, 3, 5), 16),
], ids=["8x12-t4", "8x12-t24", "4x6x8-t16"])
def test_row_major_fast_path_equals_exhaustive(grid, kernel, tile):
    pattern = Neighborhood(grid, kernel)
    n = math.prod(grid)
    fast = row_major_schedule(pattern, n, tile, tile)
    truth = pattern.exhaustive_schedule(n, n, tile, tile)
    assert fast.q_perm is None and torch.equal(fast.q_bounds, truth.q_bounds)
    assert torch.equal(fast.tile_states(), truth.tile_states())


def test_permutation_visits_fewer_tiles_2d():
    # 32 x 32 grid, 7 x 7 windows, 16-token tiles: a row-major tile is half a grid row (1 x 16), whose windows
    # span 7 rows x 22 columns; a permuted 4 x 4 box's windows span 10 x 10
    sim = simulate_pattern("neighborhood(kernel_size=7)", grid=(32, 32), heads=1, tile=16, tile_shape=(4, 4))
    rm, own = sim.schedule("row-major"), sim.schedule("pattern")
    assert own.permuted and own.tile_shape == (4, 4) and rm.tile_shape == (1, 16)
    assert own.tiles == rm.tiles == 64 * 64
    assert rm.visited == 64 * 7 * 2  # each of the 64 query tiles: 7 rows x both halves of each row
    assert own.visited < rm.visited
    assert own.computed_pairs < rm.computed_pairs
    assert rm.upper_bound < own.upper_bound <= sim.ideal_speedup


@pytest.mark.parametrize("pattern, grid, tile", [
    ("blocked(kernel_size=16)", (256,), 16),
    ("blocked(kernel_size=16)", (256,), 8),
    ("blocked(kernel_size=(4, 4))", (16, 16), 16),
], ids=["1d-b16-t16", "1d-b16-t8", "2d-b4x4-t16"])
def test_upper_bound_is_ideal_when_tiles_align_with_blocks(pattern, grid, tile):
    sim = simulate_pattern(pattern, grid=grid, tile=tile)
    own = sim.schedule("pattern")
    assert own.partial == 0 and own.computed_pairs == sim.attended_pairs
    assert own.upper_bound == sim.ideal_speedup == 1 / sim.density == 16.0


def test_causal_by_hand():
    # N = 8, tiles of 4: per head 36 attended pairs; tiles (0,0) partial, (1,0) full, (1,1) partial, (0,1) empty
    sim = simulate_pattern(Causal(), n=8, batch=2, heads=3, head_dim=5, tile=4)
    assert sim.attended_pairs == 3 * 36
    assert sim.dense_flops == 4 * 2 * 3 * 64 * 5 == 7680
    assert sim.pattern_flops == 4 * 2 * 5 * 108
    own = sim.schedule("pattern")
    assert (own.tiles, own.visited, own.full, own.partial) == (12, 9, 3, 6)
    assert own.computed_pairs == 3 * 48
    assert own.upper_bound == 64 / 48
    assert own.tile_efficiency == 36 / 48


def test_full_pattern_bound_is_one():
    sim = simulate_pattern(Full(), n=10, tile=4)
    assert sim.ideal_speedup == 1.0
    assert all(s.upper_bound == 1.0 and s.partial == 0 for s in sim.schedules)


def test_head_specific_pattern_sums_heads():
    pattern = PerHead([Causal(), Full()])
    sim = simulate_pattern(pattern, n=8, heads=2, tile=4)
    assert sim.attended_pairs == 36 + 64
    assert sim.schedule("pattern").computed_pairs == 48 + 64
    with pytest.raises(ValueError, match="heads=3"):
        simulate_pattern(pattern, n=8, heads=3)


def test_bad_input():
    with pytest.raises(ValueError, match="tile_q"):
        simulate_pattern(Causal(), n=8, tile=0)
    with pytest.raises(ValueError, match="head_dim"):
        simulate_pattern(Causal(), n=8, head_dim=0)
    with pytest.raises(TypeError, match="Pattern or a spec"):
        simulate_pattern(3, n=8)
    with pytest.raises(ValueError, match="grid= or n="):
        simulate_pattern("causal")
    with pytest.raises(ValueError, match="grid"):
        simulate_pattern("neighborhood(kernel_size=3)")
    with pytest.raises(ValueError, match="does not multiply"):
        simulate_pattern(blocked((16,), 4), n=20)


def test_row_major_skipped_with_a_note_above_the_exhaustive_limit(monkeypatch):
    import headwise.simulate.tiles as tiles

    monkeypatch.setattr(tiles, "EXHAUSTIVE_MAX_PAIRS", 99)
    sim = simulate_pattern("neighborhood(kernel_size=3)", grid=(10,), tile=4, heads=1, n=None)
    assert [s.name for s in sim.schedules] == ["row-major", "pattern"]  # 1-D: the pattern's own tiles are row-major
    sim = simulate_pattern("neighborhood(kernel_size=3)", grid=(10, 10), tile=4, heads=1)  # 4 does not divide 10
    assert [s.name for s in sim.schedules] == ["pattern"] and "not simulated" in sim.notes[0]
    sim = simulate_pattern("neighborhood(kernel_size=3)", grid=(8, 8), tile=4, heads=1)  # analytic: (1, 4) boxes
    assert [s.name for s in sim.schedules] == ["row-major", "pattern"] and not sim.notes
