"""What a tiled attention kernel must compute for a pattern: attended pairs, tiles, FLOPs, upper-bound speedup.

The analytical side of Generalized Neighborhood Attention (GNA, Hassani et al. 2025): a block-sparse kernel
computes whole tiles, so its work is set by the tiles it visits, not by the attended pairs. For a pattern and a
problem ``[B, H, N, D]`` (self-attention, ``n_q = n_kv = N``), per head ``h``:

* ``attended_h``: exact number of attended (query, key) pairs, ``density_h * N**2`` (the pattern's analytic
  density; integer, exact below ``2**53`` pairs).
* ``computed_h``: pairs in the tiles the kernel visits, full or partial, masked parts of partial tiles included
  (:meth:`TileSchedule.computed_pairs`).

FLOP convention (forward, one multiply-add = 2 FLOPs, softmax/exp/scale/mask not counted): each (query, key)
pair costs ``2 D`` FLOPs in ``Q K^T`` and ``2 D`` in ``P V`` (``Dv = D``), so

    dense_flops   = 4 B H N^2 D
    pattern_flops = 4 B D sum_h attended_h           (what an ideal element-sparse kernel would compute)
    tile_flops    = 4 B D sum_h computed_h           (what a tiled kernel computes)
    ideal_speedup = dense_flops / pattern_flops = 1 / density
    upper_bound   = dense_flops / tile_flops         (speedup over dense at the same FLOP rate; never above ideal)

Two tilings are simulated at the same tile size:

* ``row-major``: uniform tiles of ``tile_q`` queries and ``tile_kv`` keys in the original (row-major) token order,
  as a kernel without token permutation sees an N-D grid. Counted exactly: through the pattern's analytic schedule
  on ``(1, .., 1, a, g_j, .., g_last)`` boxes where a row-major run of ``tile`` tokens is such a box (a
  :class:`~headwise.patterns.Neighborhood` without dilation), else by :meth:`Pattern.exhaustive_schedule`
  (``O(N^2)`` predicate evaluations in bounded memory; skipped, with a note, above ``EXHAUSTIVE_MAX_PAIRS``).
* ``pattern``: the pattern's own :meth:`Pattern.tile_schedule`, which for N-D neighborhoods permutes tokens so a
  tile is a box of the grid (GNA's token permutation; :meth:`Neighborhood.tile_shape` picks the box).

Use :func:`simulate_pattern` from code, ``headwise simulate SPEC --grid ...`` from the shell.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from headwise.core.blocksparse import TILE_KV, TILE_Q
from headwise.patterns import Neighborhood, Pattern, from_spec
from headwise.patterns.base import TileSchedule

__all__ = ["ScheduleStats", "PatternSimulation", "simulate_pattern", "schedule_stats", "row_major_schedule",
           "row_major_box", "FLOPS_PER_PAIR_PER_DIM"]

FLOPS_PER_PAIR_PER_DIM = 4  # forward: 2 D for q . k, 2 D for p * v (multiply-add = 2 FLOPs)
EXHAUSTIVE_MAX_PAIRS = 1 << 30  # above this, row-major tiles without an analytic count are not simulated


@dataclass(frozen=True)
class ScheduleStats:
    """One tiling of the problem, summed over the heads (head-specific patterns have one schedule per head)."""

    name: str  # "row-major" (uniform tiles, original order) or "pattern" (the pattern's own schedule)
    permuted: bool  # tiles in a permuted token order
    tile_q: int  # largest query tile (tokens)
    tile_kv: int  # largest key tile (tokens)
    tile_shape: tuple[int, ...] | None  # box of the grid a tile covers, where tiles are boxes
    tiles: int  # n_q_tiles * n_kv_tiles, summed over heads
    visited: int  # tiles the kernel visits
    full: int  # visited tiles where every pair attends (no element mask)
    partial: int  # visited tiles that need the element mask
    computed_pairs: int  # pairs in the visited tiles, summed over heads
    tile_flops: int  # FLOPS_PER_PAIR_PER_DIM * B * D * computed_pairs
    upper_bound: float  # dense_flops / tile_flops
    tile_efficiency: float  # attended / computed pairs (1.0: no masked work)


@dataclass(frozen=True)
class PatternSimulation:
    """Attended pairs, FLOPs and the tilings of one pattern at one problem shape ``[B, H, N, D]``."""

    spec: str  # the spec string, or the pattern's repr
    grid: tuple[int, ...] | None
    tile: tuple[int, int]  # requested (tile_q, tile_kv)
    batch: int  # B
    heads: int  # H
    n: int  # N (n_q = n_kv)
    head_dim: int  # D
    density: float  # attended pairs / (H N^2)
    attended_pairs: int  # summed over heads (per batch element)
    dense_flops: int
    pattern_flops: int
    ideal_speedup: float  # dense_flops / pattern_flops = 1 / density
    schedules: list[ScheduleStats] = field(default_factory=list)  # tile counts and pairs summed over the H heads
    case: str | None = None  # a label (e.g. the benchmark case name)
    notes: list[str] = field(default_factory=list)  # what was not simulated, and why
    flops_convention: str = ("forward; 4 D FLOPs per (query, key) pair per head (2 D in Q K^T, 2 D in P V), "
                             "softmax not counted")

    def schedule(self, name: str) -> ScheduleStats:
        for s in self.schedules:
            if s.name == name:
                return s
        raise KeyError(f"no schedule {name!r}; have {[s.name for s in self.schedules]}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def row_major_box(grid: tuple[int, ...], tile: int) -> tuple[int, ...] | None:
    """The box a row-major run of ``tile`` tokens covers on ``grid``, when every such run is a box: ``tile`` is
    ``a * prod(grid[j:])`` with ``a`` dividing ``grid[j-1]``. E.g. ``(1, 64)`` for 64 tokens on a 128 x 128 grid,
    ``(1, 2, 32)`` on 16 x 32 x 32. None when the runs are not boxes (they wrap partway along a row)."""
    suffix = 1
    for j in reversed(range(len(grid))):
        if tile % suffix == 0 and (tile // suffix) <= grid[j] and grid[j] % (tile // suffix) == 0:
            return (1,) * j + (tile // suffix,) + tuple(grid[j + 1 :])
        suffix *= grid[j]
    return None


def _row_major_is_analytic(pattern: Pattern, tile_q: int, tile_kv: int) -> bool:
    return (isinstance(pattern, Neighborhood) and tile_q == tile_kv and pattern.ndim > 1
            and all(d == 1 for d in pattern.dilation) and row_major_box(pattern.grid, tile_q) is not None)


def row_major_schedule(pattern: Pattern, n: int, tile_q: int, tile_kv: int, head: int | None = None) -> TileSchedule:
    """Exact schedule of uniform ``tile_q`` x ``tile_kv`` tiles in the original token order (no permutation)."""
    if _row_major_is_analytic(pattern, tile_q, tile_kv):
        # boxes (1, .., a, g_j, ..) numbered row-major: the identity order, so this is the uniform tiling
        s = pattern.tile_schedule(n, n, tile_q, tile_kv, head=head, tile_shape=row_major_box(pattern.grid, tile_q))
        if s.q_perm is None and s.kv_perm is None:
            return s
    return pattern.exhaustive_schedule(n, n, tile_q, tile_kv, head=head)


def _uniform(bounds: torch.Tensor, n: int, tile: int) -> bool:
    return torch.equal(bounds, torch.tensor(list(range(0, n, tile)) + [n], dtype=torch.long))


def schedule_stats(name: str, schedules: list[TileSchedule], attended: int, batch: int, head_dim: int,
                   dense_flops: int, tile_shape: tuple[int, ...] | None = None, copies: int = 1) -> ScheduleStats:
    """Sum the tile counts and computed pairs of per-head ``schedules``; ``copies``: heads sharing each one."""
    tiles = visited = full = computed = 0
    for s in schedules:
        tiles += copies * s.n_q_tiles * s.n_kv_tiles
        visited += copies * int(s.visited.sum())
        full += copies * int((s.full & s.visited).sum())
        computed += copies * s.computed_pairs()
    tile_flops = FLOPS_PER_PAIR_PER_DIM * batch * head_dim * computed
    s0 = schedules[0]
    return ScheduleStats(
        name=name,
        permuted=any(s.q_perm is not None or s.kv_perm is not None for s in schedules),
        tile_q=int(s0.q_bounds.diff().max()),
        tile_kv=int(s0.kv_bounds.diff().max()),
        tile_shape=tile_shape,
        tiles=tiles,
        visited=visited,
        full=full,
        partial=visited - full,
        computed_pairs=computed,
        tile_flops=tile_flops,
        upper_bound=dense_flops / tile_flops if tile_flops else math.inf,
        tile_efficiency=attended / computed if computed else 1.0,
    )


def simulate_pattern(
    pattern: Pattern | str,
    *,
    grid: tuple[int, ...] | None = None,
    n: int | None = None,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    tile: int | tuple[int, int] = (TILE_Q, TILE_KV),
    tile_shape: tuple[int, ...] | None = None,
    case: str | None = None,
) -> PatternSimulation:
    """Attended pairs, dense / pattern / tile-level FLOPs and upper-bound speedups of ``pattern`` on ``[B, H, N, D]``.

    ``pattern``: a :class:`Pattern` or a spec string (built with ``grid=`` as default, as ``headwise show-pattern``
    does). ``n``: tokens, default ``prod(grid)`` (or the pattern's own grid). ``tile``: tokens per tile, or
    ``(tile_q, tile_kv)``; default the block-sparse engine's ``(TILE_Q, TILE_KV)``. ``tile_shape``: the box of the
    pattern's own schedule, for :class:`Neighborhood` (default :meth:`Neighborhood.tile_shape`, which trades wasted
    pairs for GEMM speed and may pick boxes under ``tile`` tokens). ``case``: a label kept in the result. A
    head-specific pattern needs ``heads == pattern.heads``. See the module docstring for the FLOP convention and
    the two tilings.

    >>> sim = simulate_pattern("blocked(kernel_size=16)", grid=(256,), tile=16)
    >>> sim.ideal_speedup, sim.schedule("pattern").upper_bound
    (16.0, 16.0)
    """
    spec = pattern if isinstance(pattern, str) else repr(pattern)
    if isinstance(pattern, str):
        if grid is not None:
            grid = tuple(grid)
        pattern = from_spec(pattern, grid=grid) if grid is not None else from_spec(pattern)
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern or a spec string, got {type(pattern).__name__}")
    tile_q, tile_kv = (tile, tile) if isinstance(tile, int) else tuple(tile)
    for name, value in [("batch", batch), ("heads", heads), ("head_dim", head_dim), ("tile_q", tile_q),
                        ("tile_kv", tile_kv)]:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if grid is None and isinstance(pattern, Neighborhood):
        grid = pattern.grid
    if n is None:
        if grid is None:
            raise ValueError(f"give grid= or n=: the length of {spec!r} is not known")
        n = math.prod(grid)
    pattern.check(n, n)
    if pattern.heads is not None and pattern.heads != heads:
        raise ValueError(f"{heads=} does not match the head-specific pattern's {pattern.heads} heads")
    head_ids = [None] if pattern.heads is None else list(range(heads))
    copies = heads if pattern.heads is None else 1  # a shared pattern's schedule repeats for every head

    density = pattern.density(n, n)
    attended = round(density * n * n * heads)
    dense_flops = FLOPS_PER_PAIR_PER_DIM * batch * heads * n * n * head_dim
    pattern_flops = FLOPS_PER_PAIR_PER_DIM * batch * head_dim * attended
    sim = PatternSimulation(
        spec=spec, grid=tuple(grid) if grid is not None else None, tile=(tile_q, tile_kv), batch=batch, heads=heads,
        n=n, head_dim=head_dim, density=density, attended_pairs=attended, dense_flops=dense_flops,
        pattern_flops=pattern_flops, ideal_speedup=dense_flops / pattern_flops if pattern_flops else math.inf,
        case=case,
    )

    if tile_shape is not None and not isinstance(pattern, Neighborhood):
        raise ValueError(f"{tile_shape=} applies to Neighborhood patterns only, not {type(pattern).__name__}")
    extra = {} if tile_shape is None else {"tile_shape": tuple(tile_shape)}
    own = [pattern.tile_schedule(n, n, tile_q, tile_kv, head=h, **extra) for h in head_ids]
    own_is_row_major = all(s.q_perm is None and s.kv_perm is None and _uniform(s.q_bounds, n, tile_q)
                           and _uniform(s.kv_bounds, n, tile_kv) for s in own)
    if own_is_row_major:
        rows = own
    elif _row_major_is_analytic(pattern, tile_q, tile_kv) or n * n <= EXHAUSTIVE_MAX_PAIRS:
        rows = [row_major_schedule(pattern, n, tile_q, tile_kv, head=h) for h in head_ids]
    else:
        rows = None
        sim.notes.append(f"row-major tiles not simulated: counting them takes N^2 = {n * n:,} predicate "
                         f"evaluations (limit {EXHAUSTIVE_MAX_PAIRS:,}); a tile that divides the grid's rows is "
                         "counted analytically")
    box = row_major_box(grid, tile_q) if grid is not None and tile_q == tile_kv and math.prod(grid) == n else None
    own_box = None
    if isinstance(pattern, Neighborhood):
        own_box = (tile_q,) if pattern.ndim == 1 and pattern.dilation == (1,) else pattern.tile_shape(tile_q)
        own_box = own_box if tile_shape is None else tuple(extra["tile_shape"])
    for name, scheds, shape in [("row-major", rows, box), ("pattern", own, own_box)]:
        if scheds is not None:
            stats = schedule_stats(name, scheds, attended, batch, head_dim, dense_flops, shape, copies)
            sim.schedules.append(stats)
    return sim
