"""The 1-D sliding window of language models: a band around the diagonal, cropped at the borders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.patterns.base import (
    Pattern,
    TileSchedule,
    check_tile,
    uniform_bounds,
    interval_tile_ranges,
    schedule_from_ranges,
)

__all__ = ["SlidingWindow"]


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Query ``i`` attends keys ``i - window <= j <= i + window`` (``causal``: ``i - window <= j <= i``).

    The LLM convention (Longformer's and Mistral's local attention, flash-attn's ``window_size=(window, window)``
    or ``(window, 0)``): the band is cropped at the sequence borders, so border queries see fewer keys, unlike
    :class:`~headwise.patterns.Neighborhood`, whose window shifts to keep exactly ``kernel_size`` keys. Causal
    queries see ``window + 1`` keys, themselves included (Hugging Face's ``sliding_window=W`` is ``window=W - 1``).
    Queries and keys share one index space (top-left aligned, like ``Causal(offset=0)``); ``n_q`` and ``n_kv``
    may differ, and a query with no key in range is fully masked.

    Tile schedule: uniform tiles, no permutation; each query tile visits the key tiles meeting its band.
    """

    window: int  # keys on each side of the query (only before it when causal)
    causal: bool = False  # keep only keys j <= i

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got window={self.window!r}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got causal={self.causal!r}")

    def _band(self, i: Tensor) -> tuple[Tensor, Tensor]:
        """First and last key ``[lo, hi]`` of queries ``i`` (before cropping to the keys that exist)."""
        return i - self.window, i if self.causal else i + self.window

    def mask(self, q_idx, kv_idx, head=None):
        lo, hi = self._band(q_idx)
        return (kv_idx >= lo) & (kv_idx <= hi)

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        lo, hi = self._band(torch.arange(n_q))
        return float((hi.clamp(max=n_kv - 1) - lo.clamp(min=0) + 1).clamp(min=0).sum()) / (n_q * n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        q_bounds, kv_bounds = uniform_bounds(n_q, tile_q), uniform_bounds(n_kv, tile_kv)
        lo_first, hi_first = self._band(q_bounds[:-1])  # (n_qt,)
        lo_last, hi_last = self._band(q_bounds[1:] - 1)
        ranges = interval_tile_ranges(n_kv, tile_kv, lo_first, hi_last, lo_last, hi_first)
        return schedule_from_ranges(n_q, n_kv, q_bounds, kv_bounds, *ranges)
