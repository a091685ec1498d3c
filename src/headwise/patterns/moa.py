"""The causal window with attention sinks: one head's rule in MoA (and StreamingLLM's uniform pattern).

MoA ("MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression", Fu et al., 2024) gives
each head ``h`` a causal sliding window of span ``S_h(N) = alpha_h + beta_h * N`` plus the first ``sinks``
tokens (the attention sinks of StreamingLLM, Xiao et al., 2023). This module holds the pattern of one such head
at a fixed span; the per-head, length-dependent plan lives in :mod:`headwise.moa`, which builds a
:class:`~headwise.patterns.PerHead` of these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.patterns.base import Causal, Pattern, TileSchedule, check_tile, uniform_bounds, schedule_from_states
from headwise.patterns.window import SlidingWindow

__all__ = ["SinkWindow"]


@dataclass(frozen=True)
class SinkWindow(Pattern):
    """Query ``i`` attends key ``j <= i`` iff ``i - j < span`` (the ``span`` latest keys, itself included) or
    ``j < sinks`` (the attention sinks).

    The mask is ``SlidingWindow(span - 1, causal=True) | (Causal() & (j < sinks))``, the attention density of
    MoA's reference code (``j < global_size or i - j < band_size``, ``j <= i``). Queries and keys share one index
    space (top-left aligned, like :class:`~headwise.patterns.Causal`); ``n_q`` and ``n_kv`` may differ.

    Tile schedule: exact and analytic, ``O(n_q_tiles * n_kv_tiles)``: a key tile ``[k0, k1]`` meets query tile
    ``[q0, q1]`` iff ``k0 <= q1`` and (``k0 < sinks`` or ``k1 > q0 - span``); it is full iff ``k1 <= q0`` and
    the gap of every query, keys ``sinks .. i - span``, misses it.

    Example:
        >>> from headwise.patterns import SinkWindow
        >>> [row.nonzero()[:, 0].tolist() for row in SinkWindow(span=2, sinks=1).dense_mask(5, 5)[0]]
        [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4]]
    """

    span: int  # keys i - span < j <= i are attended (span >= 1: the query itself is always attended)
    sinks: int = 0  # the first `sinks` keys are attended by every query after them

    def __post_init__(self):
        for name, low in (("span", 1), ("sinks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")

    def mask(self, q_idx, kv_idx, head=None):
        window = SlidingWindow(self.span - 1, causal=True).mask(q_idx, kv_idx)
        return window | (Causal().mask(q_idx, kv_idx) & (kv_idx < self.sinks))

    def row_counts(self, n_q: int, n_kv: int) -> torch.Tensor:
        """``(n_q,)`` int64: keys attended by each query."""
        i = torch.arange(n_q)
        start = (i - self.span + 1).clamp(min=0)  # first key of the window
        last = i.clamp(max=n_kv - 1)  # last key of the window
        window = (last - start + 1).clamp(min=0)
        sinks = torch.minimum(start, torch.tensor(self.sinks)).clamp(max=n_kv)  # sink keys before the window
        return window + sinks

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        return int(self.row_counts(n_q, n_kv).sum()) / (n_q * n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        q_bounds, kv_bounds = uniform_bounds(n_q, tile_q), uniform_bounds(n_kv, tile_kv)
        q0, q1 = q_bounds[:-1, None], q_bounds[1:, None] - 1  # (n_qt, 1) first and last query of each tile
        k0, k1 = kv_bounds[None, :-1], kv_bounds[None, 1:] - 1  # (1, n_kt) first and last key
        visited = (k0 <= q1) & ((k0 < self.sinks) | (k1 > q0 - self.span))
        # query i skips the gap sinks <= j <= i - span; the widest gap is the last query's
        gap_hi = q1 - self.span
        full = (k1 <= q0) & ((k1 < self.sinks) | (k0 > gap_hi) | (gap_hi < self.sinks))
        states = torch.where(full, 2, torch.where(visited, 1, 0)).to(torch.int8)  # (n_qt, n_kt)
        return schedule_from_states(n_q, n_kv, q_bounds, kv_bounds, states)
