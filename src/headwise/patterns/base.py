"""Pattern base class, the tile schedule, and the patterns every other one builds on.

A pattern says which (query, key) pairs may attend. It provides

* a predicate ``mask(q_idx, kv_idx, head=None) -> bool tensor`` written with broadcasting tensor ops only
  (so the same function drives the dense reference and FlexAttention's ``mask_mod``), and
* an exact tile schedule (:class:`TileSchedule`): for query tiles and key tiles, the key tiles each query tile
  must visit and whether each visited tile is full (every pair attends) or partial (the element mask is needed).

The schedule may be expressed in a permuted token order (``q_perm`` / ``kv_perm``), which is how N-D
neighborhoods get compact tiles (token permutation, as in Generalized Neighborhood Attention). The generic
schedule in :meth:`Pattern.tile_schedule` is derived from the predicate by exhaustive evaluation in bounded
memory; patterns override it with an analytic schedule, and tests check the two agree exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Pattern", "TileSchedule", "Full", "Causal", "Union", "Intersection", "PerHead"]


@dataclass(frozen=True, eq=False)
class TileSchedule:
    """Which key tiles each query tile visits, in a (possibly permuted) token order.

    Tile ``t`` of the queries covers permuted positions ``q_bounds[t]:q_bounds[t+1]``; permuted position ``p``
    holds the original token ``q_perm[p]`` (identity when ``q_perm is None``). Likewise for keys.

    Attributes:
        n_q, n_kv: sequence lengths.
        q_bounds: ``(n_q_tiles + 1,)`` int64 tile offsets into the permuted query order.
        kv_bounds: ``(n_kv_tiles + 1,)`` int64 tile offsets into the permuted key order.
        kv_tiles: ``(n_q_tiles, max_visit)`` int64, visited key tiles per query tile in ascending order,
            padded with -1.
        full: ``(n_q_tiles, max_visit)`` bool, True where every pair of the (query tile, key tile) attends.
        q_perm, kv_perm: ``(n,)`` int64 permutations or None.
    """

    n_q: int
    n_kv: int
    q_bounds: Tensor
    kv_bounds: Tensor
    kv_tiles: Tensor
    full: Tensor
    q_perm: Tensor | None = None
    kv_perm: Tensor | None = None

    @property
    def n_q_tiles(self) -> int:
        return self.q_bounds.numel() - 1

    @property
    def n_kv_tiles(self) -> int:
        return self.kv_bounds.numel() - 1

    @property
    def visited(self) -> Tensor:
        """``(n_q_tiles, max_visit)`` bool: the non-padding entries of ``kv_tiles``."""
        return self.kv_tiles >= 0

    def computed_pairs(self) -> int:
        """Number of (query, key) pairs the engine computes (visited tiles, full or partial)."""
        q_sizes = self.q_bounds.diff()
        kv_sizes = self.kv_bounds.diff()
        sizes = torch.where(self.visited, kv_sizes[self.kv_tiles.clamp(min=0)], 0)  # (n_q_tiles, max_visit)
        return int((q_sizes[:, None] * sizes).sum())

    def tile_states(self) -> Tensor:
        """``(n_q_tiles, n_kv_tiles)`` int8: 0 empty, 1 partial, 2 full (for tests and plots)."""
        states = torch.zeros(self.n_q_tiles, self.n_kv_tiles, dtype=torch.int8)
        rows = torch.arange(self.n_q_tiles)[:, None].expand_as(self.kv_tiles)
        vis = self.visited
        states[rows[vis], self.kv_tiles[vis]] = torch.where(self.full[vis], 2, 1).to(torch.int8)
        return states


def repeat_index(counts: Tensor, total: int) -> Tensor:
    """``(total,)``: ``i`` repeated ``counts[i]`` times. Same as ``torch.repeat_interleave(arange, counts)``, which
    runs in a parallel region that costs milliseconds on a loaded 2-core machine; a marked cumsum does not."""
    marks = torch.zeros(total + 1, dtype=torch.long)
    marks.index_add_(0, torch.cumsum(counts, 0), torch.ones_like(counts))
    return marks[:-1].cumsum(0)


def uniform_bounds(n: int, tile: int) -> Tensor:
    return torch.tensor(list(range(0, n, tile)) + [n], dtype=torch.long)


def schedule_from_states(
    n_q: int,
    n_kv: int,
    q_bounds: Tensor,
    kv_bounds: Tensor,
    states: Tensor,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> TileSchedule:
    """Build a :class:`TileSchedule` from a ``(n_q_tiles, n_kv_tiles)`` state matrix (0 empty, 1 partial, 2 full)."""
    visited = states > 0
    counts = visited.sum(1)
    max_visit = int(counts.max()) if counts.numel() else 0
    n_qt, n_kt = states.shape
    # stable sort puts visited tiles first, keeping ascending tile order
    order = torch.sort((~visited).to(torch.int8), dim=1, stable=True).indices[:, :max_visit]
    kv_tiles = torch.where(torch.arange(max_visit)[None, :] < counts[:, None], order, -1)
    full = torch.gather(states, 1, order) == 2
    full &= kv_tiles >= 0
    return TileSchedule(n_q, n_kv, q_bounds, kv_bounds, kv_tiles.contiguous(), full.contiguous(), q_perm, kv_perm)


def interval_tile_ranges(
    length: Tensor | int, box: int, union_lo: Tensor, union_hi: Tensor, common_lo: Tensor, common_hi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Key tile ranges of query tiles whose queries each attend one interval of keys.

    Keys ``0 .. length-1`` are cut into tiles of ``box`` keys (the last one may be shorter). A query tile whose
    queries attend, together, the keys ``[union_lo, union_hi]`` (the union of their intervals, itself an interval)
    and, each of them, the keys ``[common_lo, common_hi]`` (the intersection) visits the key tiles ``lo .. hi``
    (those meeting the union) and, among them, the tiles ``full_lo .. full_hi`` are full (inside the intersection).
    Bounds may fall outside ``[0, length)``. Returns ``(lo, hi, full_lo, full_hi)``, empty ranges have ``lo > hi``.
    """
    last = (torch.as_tensor(length) + box - 1) // box - 1  # index of the last key tile
    lo = union_lo.clamp(min=0) // box
    hi = torch.minimum(union_hi // box, last)
    hi = torch.where(union_lo > torch.as_tensor(length) - 1, -1, hi)
    full_lo = (common_lo.clamp(min=0) + box - 1) // box  # first tile starting at or after common_lo
    ends_inside = (common_hi + 1) // box - 1  # last whole tile ending at or before common_hi
    full_hi = torch.where(common_hi >= torch.as_tensor(length) - 1, last, torch.minimum(ends_inside, last))
    return lo, hi, full_lo, full_hi


def schedule_from_ranges(
    n_q: int, n_kv: int, q_bounds: Tensor, kv_bounds: Tensor,
    lo: Tensor, hi: Tensor, full_lo: Tensor, full_hi: Tensor,
    kv_boxes: Tensor | None = None, kv_first: Tensor | None = None,
    q_perm: Tensor | None = None, kv_perm: Tensor | None = None,
) -> TileSchedule:
    """Build a :class:`TileSchedule` when each query tile visits a box of key tiles (no dense state matrix).

    Key tiles come in groups; a group's tiles form a ``D``-dimensional grid of ``kv_boxes[t]`` boxes numbered
    row-major from tile ``kv_first[t]``. Query tile ``t`` visits the key boxes with coordinates
    ``lo[t, i] <= c_i <= hi[t, i]`` in every dimension ``i`` (none if any range is empty); a visited tile is full
    when ``full_lo[t, i] <= c_i <= full_hi[t, i]`` in every dimension.

    ``lo``, ``hi``, ``full_lo``, ``full_hi``, ``kv_boxes``: ``(n_q_tiles, D)`` int64 (or ``(n_q_tiles,)`` for
    ``D = 1``); ``kv_boxes`` defaults to all key tiles in one group, ``kv_first`` (``(n_q_tiles,)``) to 0.
    """
    lo, hi, full_lo, full_hi = (x.reshape(x.shape[0], -1) for x in (lo, hi, full_lo, full_hi))  # (T, D)
    n_qt, dims = lo.shape
    if kv_boxes is None:
        kv_boxes = torch.full((n_qt, 1), kv_bounds.numel() - 1, dtype=torch.long)
    kv_boxes = kv_boxes.reshape(n_qt, dims)
    kv_first = torch.zeros(n_qt, dtype=torch.long) if kv_first is None else kv_first
    counts = (hi - lo + 1).clamp(min=0)  # (T, D)
    total = counts.prod(1)  # (T,)
    max_visit = int(total.max()) if n_qt else 0
    j = torch.arange(max_visit)[None, :]  # (1, V)
    valid = j < total[:, None]  # (T, V)
    rem = j.expand(n_qt, max_visit)
    tile = torch.zeros(n_qt, max_visit, dtype=torch.long)
    full = valid.clone()
    place = torch.ones(n_qt, 1, dtype=torch.long)
    for i in reversed(range(dims)):  # decode j row-major with the per-tile radices counts[:, i]
        radix = counts[:, i : i + 1].clamp(min=1)  # (T, 1)
        c = lo[:, i : i + 1] + rem % radix  # (T, V) key box coordinate along dim i
        rem = rem // radix
        tile += c * place
        place = place * kv_boxes[:, i : i + 1]
        full &= (c >= full_lo[:, i : i + 1]) & (c <= full_hi[:, i : i + 1])
    kv_tiles = torch.where(valid, kv_first[:, None] + tile, -1)
    return TileSchedule(n_q, n_kv, q_bounds, kv_bounds, kv_tiles.contiguous(), full.contiguous(), q_perm, kv_perm)


def tile_masks(pattern: Pattern, s: TileSchedule, qt: Tensor, kt: Tensor, head: int | None = None) -> Tensor:
    """Element masks ``(P, tq_max, tk_max)`` of the tile pairs ``(qt[p], kt[p])`` of schedule ``s``, in its
    permuted order; rows and columns past a tile's size are False. Costs O(P tq tk), never O(n_q n_kv)."""
    q_sizes, kv_sizes = s.q_bounds.diff(), s.kv_bounds.diff()
    tq, tk = int(q_sizes.max()), int(kv_sizes.max())
    r, c = torch.arange(tq), torch.arange(tk)
    q_pos = (s.q_bounds[qt, None] + r).clamp(max=s.n_q - 1)  # (P, tq) permuted positions
    kv_pos = (s.kv_bounds[kt, None] + c).clamp(max=s.n_kv - 1)  # (P, tk)
    q_ids = q_pos if s.q_perm is None else s.q_perm[q_pos]
    kv_ids = kv_pos if s.kv_perm is None else s.kv_perm[kv_pos]
    inside = (r[None] < q_sizes[qt, None])[:, :, None] & (c[None] < kv_sizes[kt, None])[:, None, :]
    out = torch.zeros(qt.numel(), tq, tk, dtype=torch.bool)
    step = max(1, (1 << 22) // max(tq * tk, 1))
    for p0 in range(0, qt.numel(), step):  # bounded memory
        sl = slice(p0, p0 + step)
        out[sl] = pattern.mask(q_ids[sl, :, None], kv_ids[sl, None, :], head) & inside[sl]
    return out


class Pattern:
    """Base class of attention patterns.

    Subclasses implement :meth:`mask` (and usually :meth:`check`, :meth:`tile_schedule`, :meth:`density`
    analytically). Patterns compose with ``p | q`` (union) and ``p & q`` (intersection).

    ``heads``: ``None`` for a pattern shared by all heads, or the number of heads of a head-specific pattern.
    """

    heads: int | None = None

    # ---- the predicate --------------------------------------------------------------------------------
    def mask(self, q_idx: Tensor, kv_idx: Tensor, head: Tensor | int | None = None) -> Tensor:
        """Boolean tensor, broadcast of ``q_idx`` and ``kv_idx``: True where query ``q_idx`` may attend key ``kv_idx``."""
        raise NotImplementedError

    def check(self, n_q: int, n_kv: int) -> None:
        """Raise ``ValueError`` if the pattern cannot describe sequences of these lengths."""
        if n_q < 1 or n_kv < 1:
            raise ValueError(f"sequence lengths must be positive, got {n_q=} {n_kv=}")

    def mask_mod(self):
        """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` closure over this pattern."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.mask(q_idx, kv_idx, h)

        return mask_mod

    # ---- dense views ----------------------------------------------------------------------------------
    def dense_mask(self, n_q: int, n_kv: int, device: torch.device | str | None = None) -> Tensor:
        """Boolean mask ``[H or 1, n_q, n_kv]`` (materialized: for the reference, plots and tests)."""
        self.check(n_q, n_kv)
        return self.rows_mask(torch.arange(n_q, device=device), n_kv)

    def rows_mask(self, rows: Tensor, n_kv: int) -> Tensor:
        """Boolean mask ``[H or 1, len(rows), n_kv]`` of the query positions ``rows`` (a chunk or a sample of
        queries; call :meth:`check` with the full length first)."""
        q = rows[:, None]
        kv = torch.arange(n_kv, device=rows.device)[None, :]
        if self.heads is None:
            return self.mask(q, kv).expand(len(rows), n_kv)[None]
        h = torch.arange(self.heads, device=rows.device)[:, None, None]
        return self.mask(q[None], kv[None], h).expand(self.heads, len(rows), n_kv)

    def density(self, n_q: int, n_kv: int) -> float:
        """Exact fraction of attended (query, key) pairs (averaged over heads for head-specific patterns)."""
        self.check(n_q, n_kv)
        total = 0
        heads = [None] if self.heads is None else list(range(self.heads))
        for h in heads:
            for q0, block in self._row_blocks(n_q, n_kv, h):
                total += int(block.sum())
        return total / (n_q * n_kv * len(heads))

    def _row_blocks(self, n_q: int, n_kv: int, head: int | None, rows: int | None = None):
        """Yield ``(q0, mask[q0:q0+rows, :])`` in bounded memory (about 2**24 elements per block)."""
        rows = rows or max(1, (1 << 24) // max(n_kv, 1))
        kv = torch.arange(n_kv)[None, :]
        for q0 in range(0, n_q, rows):
            q = torch.arange(q0, min(q0 + rows, n_q))[:, None]
            yield q0, self.mask(q, kv, head).expand(q.shape[0], n_kv)

    # ---- the tile schedule ----------------------------------------------------------------------------
    def tile_schedule(self, n_q: int, n_kv: int, tile_q: int = 64, tile_kv: int = 64, head: int | None = None) -> TileSchedule:
        """Exact tile schedule; the base class derives it from the predicate (no permutation)."""
        return self.exhaustive_schedule(n_q, n_kv, tile_q, tile_kv, head)

    def exhaustive_schedule(
        self, n_q: int, n_kv: int, tile_q: int = 64, tile_kv: int = 64, head: int | None = None,
        q_bounds: Tensor | None = None, kv_bounds: Tensor | None = None,
        q_perm: Tensor | None = None, kv_perm: Tensor | None = None,
    ) -> TileSchedule:
        """Schedule by evaluating the predicate on every pair (bounded memory, O(n_q n_kv) time).

        The ground truth that analytic schedules are tested against. ``q_bounds``/``kv_bounds`` and the
        permutations default to uniform tiles in the original order.
        """
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        q_bounds = uniform_bounds(n_q, tile_q) if q_bounds is None else q_bounds
        kv_bounds = uniform_bounds(n_kv, tile_kv) if kv_bounds is None else kv_bounds
        q_ids = torch.arange(n_q) if q_perm is None else q_perm
        kv_ids = (torch.arange(n_kv) if kv_perm is None else kv_perm)[None, :]
        n_qt, n_kt = q_bounds.numel() - 1, kv_bounds.numel() - 1
        kv_tile_of = repeat_index(kv_bounds.diff(), n_kv)  # (n_kv,)
        q_tile_of = repeat_index(q_bounds.diff(), n_q)  # (n_q,)
        any_ = torch.zeros(n_qt, n_kt, dtype=torch.bool)
        all_ = torch.ones(n_qt, n_kt, dtype=torch.bool)
        rows = max(1, (1 << 23) // max(n_kv, 1))
        for p0 in range(0, n_q, rows):
            p1 = min(p0 + rows, n_q)
            m = self.mask(q_ids[p0:p1, None], kv_ids, head).expand(p1 - p0, n_kv)  # (rows, n_kv)
            cnt = torch.zeros(p1 - p0, n_kt, dtype=torch.long).index_add_(1, kv_tile_of, m.long())
            qt = q_tile_of[p0:p1]
            tot = torch.zeros(n_qt, n_kt, dtype=torch.long).index_add_(0, qt, cnt)
            rows_in = torch.zeros(n_qt, dtype=torch.long).index_add_(0, qt, torch.ones_like(qt))
            touched = rows_in > 0
            any_ |= tot > 0
            all_[touched] &= tot[touched] == rows_in[touched, None] * kv_bounds.diff()[None, :]
        states = torch.where(all_, 2, torch.where(any_, 1, 0)).to(torch.int8)
        return schedule_from_states(n_q, n_kv, q_bounds, kv_bounds, states, q_perm, kv_perm)

    # ---- composition ----------------------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other)


def check_tile(tile_q: int, tile_kv: int) -> None:
    if not isinstance(tile_q, int) or tile_q < 1:
        raise ValueError(f"tile_q must be a positive int, got {tile_q=}")
    if not isinstance(tile_kv, int) or tile_kv < 1:
        raise ValueError(f"tile_kv must be a positive int, got {tile_kv=}")


@dataclass(frozen=True)
class Full(Pattern):
    """Every query attends every key."""

    def mask(self, q_idx, kv_idx, head=None):
        return torch.ones_like(q_idx, dtype=torch.bool) | torch.ones_like(kv_idx, dtype=torch.bool)

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        return 1.0

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None):
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        qb, kb = uniform_bounds(n_q, tile_q), uniform_bounds(n_kv, tile_kv)
        states = torch.full((qb.numel() - 1, kb.numel() - 1), 2, dtype=torch.int8)
        return schedule_from_states(n_q, n_kv, qb, kb, states)


@dataclass(frozen=True)
class Causal(Pattern):
    """Query ``i`` attends keys ``j <= i + offset``.

    ``offset=0`` is the usual lower triangle (top-left aligned, like ``is_causal`` in torch SDPA). For decoding
    ``n_q`` new queries against a cache of ``n_kv`` keys use ``offset = n_kv - n_q`` (bottom-right aligned).
    Query rows with no key (``i + offset < 0``) are fully masked and return zeros.
    """

    offset: int = 0  # key j is visible to query i when j <= i + offset

    def __post_init__(self):
        if not isinstance(self.offset, int):
            raise TypeError(f"offset must be an int, got {self.offset=!r}")

    def mask(self, q_idx, kv_idx, head=None):
        return kv_idx <= q_idx + self.offset

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        i = torch.arange(n_q)
        return float((i + self.offset + 1).clamp(0, n_kv).sum()) / (n_q * n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None):
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        qb, kb = uniform_bounds(n_q, tile_q), uniform_bounds(n_kv, tile_kv)
        q_first, q_last = qb[:-1, None], qb[1:, None] - 1  # (n_qt, 1)
        k_first, k_last = kb[None, :-1], kb[None, 1:] - 1  # (1, n_kt)
        any_ = k_first <= q_last + self.offset
        all_ = k_last <= q_first + self.offset
        states = torch.where(all_, 2, torch.where(any_, 1, 0)).to(torch.int8)
        return schedule_from_states(n_q, n_kv, qb, kb, states)


class _Combined(Pattern):
    def __init__(self, *parts: Pattern):
        flat: list[Pattern] = []
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"patterns combine only with patterns, got {type(p).__name__}: {p!r}")
            flat.extend(p.parts if type(p) is type(self) else [p])
        heads = {p.heads for p in flat if p.heads is not None}
        if len(heads) > 1:
            raise ValueError(f"combined head-specific patterns disagree on the number of heads: {sorted(heads)}")
        self.parts = tuple(flat)
        self.heads = heads.pop() if heads else None

    def check(self, n_q, n_kv):
        for p in self.parts:
            p.check(n_q, n_kv)

    def __repr__(self):
        return "(" + f" {self._op} ".join(repr(p) for p in self.parts) + ")"

    def __eq__(self, other):
        return type(self) is type(other) and self.parts == other.parts

    def __hash__(self):
        return hash((type(self).__name__, self.parts))


class Union(_Combined):
    """``p | q``: a pair attends if it attends in any part."""

    _op = "|"

    def mask(self, q_idx, kv_idx, head=None):
        return functools.reduce(torch.logical_or, (p.mask(q_idx, kv_idx, head) for p in self.parts))


class Intersection(_Combined):
    """``p & q``: a pair attends if it attends in every part.

    Tile schedule: the lead part's (the first that is not key-only, such as :class:`KeyMask`) tiling and
    visited tiles, each classified exactly by evaluating the combined predicate on it: O(visited pairs).
    """

    _op = "&"

    def mask(self, q_idx, kv_idx, head=None):
        return functools.reduce(torch.logical_and, (p.mask(q_idx, kv_idx, head) for p in self.parts))

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None):
        self.check(n_q, n_kv)
        lead = next((p for p in self.parts if not getattr(p, "key_only", False)), self.parts[0])
        s = lead.tile_schedule(n_q, n_kv, tile_q, tile_kv, head=head)
        qt, j = s.visited.nonzero(as_tuple=True)
        kt = s.kv_tiles[qt, j]
        count = tile_masks(self, s, qt, kt, head).sum((1, 2))  # (P,) attended pairs per visited tile
        size = s.q_bounds.diff()[qt] * s.kv_bounds.diff()[kt]
        states = torch.zeros(s.n_q_tiles, s.n_kv_tiles, dtype=torch.int8)
        states[qt, kt] = torch.where(count == size, 2, torch.where(count > 0, 1, 0)).to(torch.int8)
        return schedule_from_states(n_q, n_kv, s.q_bounds, s.kv_bounds, states, s.q_perm, s.kv_perm)


class PerHead(Pattern):
    """Head-specific patterns: head ``h`` uses ``patterns[h]``.

    ``head`` in :meth:`mask` may be an int or a tensor broadcastable against the indices (as FlexAttention
    passes it). The engine schedules each head separately.
    """

    def __init__(self, patterns):
        patterns = list(patterns)
        if not patterns:
            raise ValueError("PerHead needs at least one pattern, got patterns=[]")
        for i, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise TypeError(f"patterns[{i}] must be a Pattern, got {type(p).__name__}")
            if p.heads is not None:
                raise ValueError(f"patterns[{i}] is itself head-specific ({p!r}); nest PerHead is not supported")
        self.patterns = tuple(patterns)
        self.heads = len(patterns)

    def check(self, n_q, n_kv):
        for p in self.patterns:
            p.check(n_q, n_kv)

    def mask(self, q_idx, kv_idx, head=None):
        if head is None:
            raise ValueError("PerHead.mask needs head= (an int or a tensor of head indices)")
        if isinstance(head, int):
            if not 0 <= head < self.heads:
                raise ValueError(f"{head=} out of range for PerHead with {self.heads} heads")
            return self.patterns[head].mask(q_idx, kv_idx)
        out = None
        for i, p in enumerate(self.patterns):
            m = (head == i) & p.mask(q_idx, kv_idx)
            out = m if out is None else out | m
        return out

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None):
        if head is None:
            raise ValueError("PerHead.tile_schedule needs head= (each head has its own schedule)")
        return self.patterns[head].tile_schedule(n_q, n_kv, tile_q, tile_kv)

    def density(self, n_q, n_kv):
        return sum(p.density(n_q, n_kv) for p in self.patterns) / self.heads

    def __repr__(self):
        return f"PerHead({list(self.patterns)!r})"

    def __eq__(self, other):
        return isinstance(other, PerHead) and self.patterns == other.patterns

    def __hash__(self):
        return hash(("PerHead", self.patterns))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)

