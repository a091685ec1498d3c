"""Neighborhood attention over 1-D, 2-D and 3-D token grids (NATTEN / Generalized Neighborhood Attention).

One pattern covers sliding-window (neighborhood), strided and blocked attention, dilated or not, causal or not,
per dimension, with the exact semantics of NATTEN (Hassani et al.: NA, CVPR 2023; DiNA, 2022; Faster NA, 2024;
Generalized Neighborhood Attention, 2025 -- https://github.com/SHI-Labs/NATTEN, its reference mask).

Its tile schedule is analytic: tokens are permuted so that a tile is a box of the grid inside one dilation group
(token permutation, as in GNA), and the key tiles a query tile visits are found per dimension in closed form.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.patterns.base import (
    Pattern,
    TileSchedule,
    check_tile,
    ceil_div,
    interval_tile_ranges,
    repeat_index,
    schedule_from_ranges,
)

__all__ = ["Neighborhood", "blocked"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def per_dim(name: str, value, ndim: int) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` dims, or check a sequence of ``ndim`` ints; every entry positive."""
    values = (value,) * ndim if _is_int(value) else value
    if not isinstance(values, (tuple, list)) or len(values) != ndim:
        raise ValueError(f"{name} must be an int or a sequence of {ndim} ints (one per grid dim), got {name}={value!r}")
    if not all(_is_int(v) for v in values):
        raise ValueError(f"{name} must hold ints, got {name}={value!r}")
    if min(values) < 1:
        raise ValueError(f"{name} must be positive in every dim, got {name}={value!r}")
    return tuple(int(v) for v in values)


def _at_most(x: Tensor, bound: Tensor | int) -> Tensor:
    return torch.minimum(x, bound) if isinstance(bound, Tensor) else x.clamp(max=bound)


def _window(x: Tensor, length: Tensor | int, kernel: int, stride: int, causal: bool) -> tuple[Tensor, Tensor]:
    """First and last key ``[lo, hi]`` that query ``x`` attends along one axis of ``length`` tokens (one dilation
    group, coordinates within the group). Broadcasting tensor ops only."""
    if causal:
        leader = _at_most((x // stride) * stride + stride - 1, length - 1)  # last of its stride group
        return (leader - kernel + 1).clamp(min=0), x
    leader = _at_most((x // stride) * stride + stride // 2, length - 1)  # centre of its stride group
    start = _at_most((leader - kernel // 2).clamp(min=0), length - kernel)  # shifted, not cropped
    return start, start + kernel - 1


@dataclass(frozen=True)
class Neighborhood(Pattern):
    """Neighborhood attention on a token grid, with NATTEN's (GNA's) kernel size, stride, dilation and causality.

    Tokens lie on a grid ``grid = (N,)``, ``(H, W)`` or ``(T, H, W)``, flattened row-major (in 2-D the
    token at row ``r``, column ``c`` is ``r * W + c``); ``n_q = n_kv = prod(grid)`` (self-attention). ``kernel_size``, ``stride``,
    ``dilation`` and ``causal`` are ints (bools) for every dim, or one per dim. Query ``q`` attends key ``k``
    iff, in every dim, with ``L`` the axis length, ``n = kernel_size``, ``s = stride``, ``d = dilation``:

    1. *Dilation group*: ``q % d == k % d`` (the axis splits into ``d`` interleaved groups; group ``g`` holds
       ``L // d + (g < L % d)`` tokens, ``L_g``). Below, ``x = q // d`` and ``y = k // d`` are coordinates within
       the group.
    2. *Window* (non-causal): the stride group's leader ``c = min((x // s) * s + s // 2, L_g - 1)`` (its centre,
       the right one for even ``s``) sets the window start ``a = clamp(c - n // 2, 0, L_g - n)``, and
       ``a <= y <= a + n - 1``: exactly ``n`` keys, the window shifted (not cropped) at the borders.
       All queries of a stride group (``x // s`` equal) share their window.
    3. *Window* (causal): the leader is the group's last query ``c = min((x // s) * s + s - 1, L_g - 1)``, and
       ``max(c - n + 1, 0) <= y <= x``: the leader's window of ``n`` keys, cropped at the query itself and at
       the start of the axis (early queries see fewer keys).

    ``stride = 1`` is neighborhood (sliding-window) attention, ``stride = kernel_size`` blocked attention
    (:func:`blocked`), values in between strided sliding windows. Requirements: ``1 <= stride <= kernel_size``,
    ``kernel_size * dilation <= L`` (so every group holds at least one window).

    Worked example, 1-D, ``grid=(9,), kernel_size=3, stride=2, dilation=2``. Group 0 holds tokens 0 2 4 6 8
    (``L_g = 5``), group 1 tokens 1 3 5 7 (``L_g = 4``). In group 0 the queries at ``x = 0, 1`` have leader 1,
    start 0, keys ``x' = 0..2`` (tokens 0 2 4); ``x = 2, 3`` have leader 3, start 2; ``x = 4`` has leader 4,
    start ``min(3, 5 - 3) = 2`` (shifted back): tokens 4 6 8. In group 1 ``x = 0, 1`` see tokens 1 3 5 and
    ``x = 2, 3`` (leader 3, start ``min(2, 4 - 3) = 1``) see tokens 3 5 7::

        query  0 1 2 3 4 5 6 7 8      query sees (causal=True)
          0    x . x . x . . . .        0 : 0
          1    . x . x . x . . .        1 : 1
          2    x . x . x . . . .        2 : 0 2
          3    . x . x . x . . .        3 : 1 3
          4    . . . . x . x . x        4 : 2 4       (leader 6: window 2 4 6, cropped at 4)
          5    . . . x . x . x .        5 : 3 5
          6    . . . . x . x . x        6 : 2 4 6
          7    . . . x . x . x .        7 : 3 5 7
          8    . . . . x . x . x        8 : 4 6 8

    Deviation: NATTEN requires ``kernel_size >= 2``; ``kernel_size = 1`` (each token attends itself, within its
    dilation group) is accepted here.

    Tile schedule (:meth:`tile_schedule`): 1-D without dilation keeps the token order with uniform tiles; otherwise
    tokens are permuted (GNA's token permutation) by dilation group, then by box of shape :meth:`tile_shape` (boxes
    row-major over the group's sub-grid, edge boxes smaller), then row-major within the box; query and key tiles
    are these boxes.
    """

    grid: tuple[int, ...]  # token grid (N,), (H, W) or (T, H, W); tokens flattened row-major
    kernel_size: tuple[int, ...] | int  # keys per query along each dim
    stride: tuple[int, ...] | int = 1  # queries per shared window along each dim (1 <= stride <= kernel_size)
    dilation: tuple[int, ...] | int = 1  # interleaved groups along each dim
    causal: tuple[bool, ...] | bool = False  # causal along each dim

    ROW_COST = 8.0  # tile-shape cost model: relative GEMM overhead per query row, see tile_shape

    def __post_init__(self):
        grid = (self.grid,) if _is_int(self.grid) else self.grid
        if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
            raise ValueError(f"grid must be (N,), (H, W) or (T, H, W), got grid={self.grid!r}")
        grid = per_dim("grid", tuple(grid), len(grid))
        ndim = len(grid)
        kernel = per_dim("kernel_size", self.kernel_size, ndim)
        stride = per_dim("stride", self.stride, ndim)
        dilation = per_dim("dilation", self.dilation, ndim)
        causal = (self.causal,) * ndim if isinstance(self.causal, bool) else self.causal
        if not isinstance(causal, (tuple, list)) or len(causal) != ndim or not all(isinstance(c, bool) for c in causal):
            raise ValueError(f"causal must be a bool or a sequence of {ndim} bools, got causal={self.causal!r}")
        for i in range(ndim):
            if kernel[i] > grid[i]:
                raise ValueError(f"kernel_size={self.kernel_size!r} exceeds grid={grid!r} along dim {i}")
            if kernel[i] * dilation[i] > grid[i]:
                raise ValueError(
                    f"kernel_size * dilation exceeds grid along dim {i}: kernel_size={self.kernel_size!r}, "
                    f"dilation={self.dilation!r}, grid={grid!r}"
                )
            if stride[i] > kernel[i]:
                raise ValueError(f"stride={self.stride!r} exceeds kernel_size={self.kernel_size!r} along dim {i}")
        for name, value in [("grid", grid), ("kernel_size", kernel), ("stride", stride),
                            ("dilation", dilation), ("causal", tuple(causal))]:
            object.__setattr__(self, name, value)

    # ---- geometry ---------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def n(self) -> int:
        """Number of tokens, ``prod(grid)``."""
        return math.prod(self.grid)

    def _group_lengths(self, i: int) -> Tensor:
        """``(dilation[i],)`` number of tokens in each dilation group along dim ``i``."""
        size, d = self.grid[i], self.dilation[i]
        return size // d + (torch.arange(d) < size % d).long()

    def window(self, i: int, x: Tensor, length: Tensor | int) -> tuple[Tensor, Tensor]:
        """``[lo, hi]`` keys (within-group coordinates) of queries ``x`` along dim ``i``, in a group of ``length``."""
        return _window(x, length, self.kernel_size[i], self.stride[i], self.causal[i])

    # ---- the predicate ----------------------------------------------------------------------------------
    def mask(self, q_idx, kv_idx, head=None):
        out = None
        for i in reversed(range(self.ndim)):  # row-major: the last dim varies fastest
            size, d = self.grid[i], self.dilation[i]
            xq, q_idx = q_idx % size, q_idx // size
            xk, kv_idx = kv_idx % size, kv_idx // size
            if d == 1:
                lo, hi = self.window(i, xq, size)
                m = (xk >= lo) & (xk <= hi)
            else:
                length = size // d + (xq % d < size % d).long()  # tokens in the query's dilation group
                lo, hi = self.window(i, xq // d, length)
                m = (xq % d == xk % d) & (xk // d >= lo) & (xk // d <= hi)
            out = m if out is None else out & m
        return out

    def check(self, n_q, n_kv):
        super().check(n_q, n_kv)
        if n_q != self.n or n_kv != self.n:
            raise ValueError(f"grid={self.grid} does not multiply to the sequence lengths {n_q=} {n_kv=} "
                             f"(prod(grid) = {self.n})")

    def _keys_per_dim(self, i: int) -> int:
        """Sum over the queries of one axis of the number of keys each attends along that axis."""
        if not self.causal[i]:
            return self.grid[i] * self.kernel_size[i]
        lengths = self._group_lengths(i)  # (d,)
        x = torch.arange(int(lengths.max()))[None, :]  # (1, L_g)
        lo, hi = self.window(i, x, lengths[:, None])  # (d, L_g)
        return int(torch.where(x < lengths[:, None], hi - lo + 1, 0).sum())

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        pairs = math.prod(self._keys_per_dim(i) for i in range(self.ndim))  # the mask is a product over dims
        return pairs / (n_q * n_kv)

    # ---- the tile schedule ------------------------------------------------------------------------------
    # Index math below uses 1-D index_select on contiguous tensors: advanced indexing of small tensors enters
    # parallel regions that cost milliseconds each on a loaded 2-core machine.
    def _dim_ranges(self, i: int, box_q, box_kv) -> tuple[Tensor, ...]:
        """Per dilation group and query box along dim ``i``: the visited and full key box ranges.

        Returns ``(lo, hi, full_lo, full_hi)``, each ``(dilation[i], M)`` (entries past a group's last box are
        meaningless); ``box_q``/``box_kv`` are ints, or tensors broadcasting against ``(dilation[i], M)``. A box's
        union of windows is an interval (windows move monotonically, by at most ``stride <= kernel_size``), and so
        is their intersection, ``[lo(last query), hi(first query)]``.
        """
        lengths = self._group_lengths(i)[:, None]  # (d, 1)
        smallest = box_q if isinstance(box_q, int) else int(box_q.min())
        m = torch.arange(ceil_div(int(lengths.max()), smallest))  # (M,)
        first = m * box_q  # (..., 1, M)
        last = torch.minimum(first + box_q, lengths) - 1  # (..., d, M)
        lo_first, hi_first = self.window(i, first, lengths)
        lo_last, hi_last = self.window(i, last, lengths)
        return interval_tile_ranges(lengths, box_kv, lo_first, hi_last, lo_last, hi_first)

    def _dim_cost(self, i: int, boxes: Tensor) -> Tensor:
        """``(B,)`` computed (query, key) pairs along dim ``i`` for each box size in ``boxes``, summed over the
        dilation groups. The schedule is a product over dims, so its total is the product of these sums."""
        lengths = self._group_lengths(i)[:, None]  # (d, 1)
        chunk = max(1, (1 << 22) // (len(lengths) * int(lengths.max())))  # bound the (chunk, d, M) temporaries
        out = []
        for part in boxes.split(chunk):
            box = part[:, None, None]  # (b, 1, 1)
            lo, hi, _, _ = self._dim_ranges(i, box, box)  # (b, d, M)
            m = torch.arange(lo.shape[-1])
            q_size = (torch.minimum((m + 1) * box, lengths) - m * box).clamp(min=0)  # (b, d, M), 0 past the last box
            kv_size = torch.minimum((hi + 1) * box, lengths) - lo * box  # keys in the visited boxes
            out.append((q_size * kv_size).sum((1, 2)))
        return torch.cat(out)

    @functools.lru_cache(maxsize=64)
    def tile_shape(self, tile_q: int = 64) -> tuple[int, ...]:
        """Box shape (tokens per dim) of a tile, with ``prod(shape) <= tile_q``, chosen for the engine's speed.

        1-D without dilation: ``(tile_q,)``. Otherwise every shape that fits (no box dim larger than its dilation
        group's axis, at least ``tile_q / 4`` tokens, every dim dividing or a multiple of the stride, so blocked
        windows fall on whole tiles) is
        scored by its computed pairs (exact, per dim) times ``1 + ROW_COST / prod(shape)``: small tiles waste
        fewer pairs at the borders of the windows, but their GEMMs run slower (on our 2-core CPU the fused
        kernel's cost per computed pair grew about as ``1 + 8 / rows``, measured over 2-D and 3-D boxes of
        16 to 64 tokens). Ties go to the larger, then the more balanced shape. E.g. ``(4, 8)`` for a 17 x 17
        kernel on a 128 x 128 grid with ``tile_q = 64``.
        """
        check_tile(tile_q, tile_q)
        if self.ndim == 1 and self.dilation == (1,):
            return (tile_q,)
        limits = [min(tile_q, ceil_div(g, d)) for g, d in zip(self.grid, self.dilation)]
        cost = [self._dim_cost(i, torch.arange(1, lim + 1)).double() for i, lim in enumerate(limits)]  # per dim (lim,)
        sizes = torch.arange(1, limits[0] + 1)[:, None]  # (S, 1)
        for lim in limits[1:]:  # extend dim by dim, keeping only shapes that fit: (S, D) at the end
            sizes = torch.cat([sizes.repeat_interleave(lim, 0), torch.arange(1, lim + 1).repeat(len(sizes))[:, None]], 1)
            sizes = sizes[sizes.prod(1) <= tile_q]
        stride = torch.tensor(self.stride)
        aligned = ((stride % sizes == 0) | (sizes % stride == 0)).all(1)  # (S,) every dim divides or is a multiple
        keys = []
        sizes = sizes[aligned]
        big = sizes.prod(1) >= min(tile_q // 4, int(sizes.prod(1).max()))  # the model was measured down to 16 rows
        for shape in sizes[big].tolist():
            rows = math.prod(shape)
            pairs = math.prod(float(cost[i][b - 1]) for i, b in enumerate(shape))
            keys.append((round(pairs * (1 + self.ROW_COST / rows), 6), -rows, max(shape), tuple(shape)))
        return min(keys)[3]

    def _tiles(self, box: tuple[int, ...]):
        """Tiles in schedule order: dilation group (row-major), then box (row-major within the group's sub-grid).

        Returns per tile ``(T, D)``: its group's coordinates, its box coordinates, its box size, the number of
        boxes per dim of its group; ``(T,)`` the first tile of its group; and ``(G,)`` each group's first tile.
        """
        lengths = [self._group_lengths(i) for i in range(self.ndim)]  # per dim (d_i,)
        groups = torch.cartesian_prod(*[torch.arange(d) for d in self.dilation]).reshape(-1, self.ndim)  # (G, D)
        groups = [groups[:, i].contiguous() for i in range(self.ndim)]  # per dim (G,)
        per_group = [((lengths[i] + box[i] - 1) // box[i]).index_select(0, groups[i]) for i in range(self.ndim)]
        count = torch.stack(per_group, 1).prod(1)  # (G,) tiles per group
        first = torch.cumsum(count, 0) - count  # (G,)
        n_tiles = int(count.sum())
        group_of = repeat_index(count, n_tiles)  # (T,) group of each tile
        rem = torch.arange(n_tiles) - first.index_select(0, group_of)  # (T,) tile index within its group
        coord, n_box, gc, size = [None] * self.ndim, [None] * self.ndim, [None] * self.ndim, [None] * self.ndim
        for i in reversed(range(self.ndim)):
            n_box[i] = per_group[i].index_select(0, group_of)
            coord[i], rem = rem % n_box[i], rem // n_box[i]
            gc[i] = groups[i].index_select(0, group_of)
            size[i] = (lengths[i].index_select(0, gc[i]) - coord[i] * box[i]).clamp(max=box[i])
        stack = functools.partial(torch.stack, dim=1)
        return stack(gc), stack(coord), stack(size), stack(n_box), first.index_select(0, group_of), first

    def _permutation(self, box: tuple[int, ...], group_first: Tensor, bounds: Tensor) -> Tensor | None:
        """Original token at each permuted position; None if that is the identity.

        Computed per axis and combined by broadcasting: a token's group, its box within the group and its place
        within the box are row-major numbers over the dims (Horner's scheme with per-axis radices)."""
        group = tile = local = 0
        for i in range(self.ndim):
            size, d, b = self.grid[i], self.dilation[i], box[i]
            x = torch.arange(size)
            g, xg = x % d, x // d  # dilation group, coordinate within it
            length = self._group_lengths(i).index_select(0, g)  # (L,) tokens in the token's group
            view = [1] * self.ndim
            view[i] = size
            group = group * d + g.view(view)
            tile = tile * ((length + b - 1) // b).view(view) + (xg // b).view(view)
            local = local * (length - (xg // b) * b).clamp(max=b).view(view) + (xg % b).view(view)
        tile = tile + group_first.index_select(0, group.reshape(-1)).view(self.grid)
        position = (bounds.index_select(0, tile.reshape(-1)) + local.reshape(-1))  # (N,) permuted position of token
        order = torch.arange(self.n)
        if torch.equal(position, order):
            return None
        return torch.empty_like(order).scatter_(0, position, order)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None, *, tile_shape=None) -> TileSchedule:
        """Exact analytic schedule, laid out for the engine (see the class docstring).

        1-D without dilation: uniform tiles of ``tile_q`` queries and ``tile_kv`` keys (or ``tile_shape[0]`` both),
        no permutation. Otherwise query and key tiles are the boxes of ``tile_shape`` (default
        :meth:`tile_shape` ``(tile_q)``; ``tile_kv`` is then unused) and ``q_perm = kv_perm`` is the token
        permutation (None where it is the identity). A query tile visits the key boxes of its dilation group that
        meet the union of its queries' windows (per dim an interval of boxes), full where every query's window
        covers the whole key box.
        """
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        if tile_shape is not None:
            tile_shape = per_dim("tile_shape", tile_shape, self.ndim)
        if self.ndim == 1 and self.dilation == (1,):
            box_q, box_kv = (tile_shape[0],) * 2 if tile_shape is not None else (tile_q, tile_kv)
            return self._schedule((box_q,), (box_kv,))
        box = tile_shape if tile_shape is not None else self.tile_shape(tile_q)
        return self._schedule(box, box)

    def _schedule(self, box_q: tuple[int, ...], box_kv: tuple[int, ...]) -> TileSchedule:
        gc, coord, size, n_box, tile_group_first, group_first = self._tiles(box_q)
        q_bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(size.prod(1), 0)])
        ranges = [[], [], [], []]  # lo, hi, full_lo, full_hi: per dim (T,)
        for i in range(self.ndim):
            per_dim = self._dim_ranges(i, box_q[i], box_kv[i])  # 4 x (d_i, M_i)
            flat = gc[:, i] * per_dim[0].shape[1] + coord[:, i]  # (T,) entry of each query tile
            for r in range(4):
                ranges[r].append(per_dim[r].reshape(-1).index_select(0, flat))
        lo, hi, full_lo, full_hi = (torch.stack(r, 1) for r in ranges)  # (T, D)
        if box_kv != box_q:  # 1-D, no dilation: uniform tiles of different sizes
            kv_bounds = torch.tensor(list(range(0, self.n, box_kv[0])) + [self.n], dtype=torch.long)
            return schedule_from_ranges(self.n, self.n, q_bounds, kv_bounds, lo, hi, full_lo, full_hi)
        no_perm = self.ndim == 1 and self.dilation == (1,)
        perm = None if no_perm else self._permutation(box_q, group_first, q_bounds)
        return schedule_from_ranges(self.n, self.n, q_bounds, q_bounds, lo, hi, full_lo, full_hi,
                                    n_box, tile_group_first, perm, perm)


def blocked(grid, kernel_size, dilation=1, causal=False) -> Neighborhood:
    """Blocked attention: :class:`Neighborhood` with ``stride = kernel_size`` (non-overlapping windows; each token
    attends the block of ``kernel_size`` tokens it falls in, per dim; a last, partial block of an axis attends the
    last ``kernel_size`` tokens of the axis, the window shifted back as at every border; causal blocks are cropped
    at the query)."""
    return Neighborhood(grid, kernel_size, stride=kernel_size, dilation=dilation, causal=causal)
