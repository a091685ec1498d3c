"""Label-based patterns: attention within segments (packed documents, regions, subjects), and key masks."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.patterns.base import Pattern, TileSchedule, check_tile, uniform_bounds, schedule_from_states

__all__ = ["Segments", "KeyMask"]


def as_vector(name: str, values, kind: str) -> Tensor:
    """A non-empty 1-D tensor of integer labels (``kind="int"``) or booleans (``kind="bool"``), on the CPU."""
    t = torch.as_tensor(values)
    if kind == "bool":
        ok = t.dtype == torch.bool
    else:
        ok = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    if t.dim() != 1 or t.numel() == 0 or not ok:
        raise ValueError(f"{name} must be a non-empty 1-D {kind} tensor or list, got {name} with dtype {t.dtype} "
                         f"and shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=torch.long if kind == "int" else torch.bool)


def brief(t: Tensor) -> str:
    values = t.tolist()
    return repr(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...] (n={len(values)})"


def _is_grouped(labels: Tensor) -> bool:
    """True when every label occupies one contiguous run."""
    runs = 1 + int((labels[1:] != labels[:-1]).sum())
    return runs == torch.unique(labels).numel()


class Segments(Pattern):
    """Query ``i`` attends key ``j`` iff ``labels[i] == kv_labels[j]`` (block-diagonal after grouping).

    For documents packed in one sequence, image regions, or subjects kept apart. ``labels``: 1-D ints, one per
    query (``n_q = len(labels)``); ``kv_labels``: one per key, default ``labels`` (self-attention). A query whose
    label no key carries is fully masked.

    Tile schedule: exact and dense in tiles (``O(n_q_tiles * n_kv_tiles)``). Where the labels do not already form
    contiguous runs, queries (keys) are permuted by a stable sort of their labels, so each segment is one run.
    """

    def __init__(self, labels, kv_labels=None):
        self.labels = as_vector("labels", labels, "int")
        self.kv_labels = self.labels if kv_labels is None else as_vector("kv_labels", kv_labels, "int")
        self._device_copies: dict = {}

    def _on(self, device) -> tuple[Tensor, Tensor]:
        if device not in self._device_copies:
            self._device_copies[device] = (self.labels.to(device), self.kv_labels.to(device))
        return self._device_copies[device]

    def mask(self, q_idx, kv_idx, head=None):
        labels, kv_labels = self._on(q_idx.device)
        return labels[q_idx] == kv_labels[kv_idx]

    def check(self, n_q, n_kv):
        super().check(n_q, n_kv)
        if n_q != len(self.labels) or n_kv != len(self.kv_labels):
            raise ValueError(f"Segments has {len(self.labels)} query labels and {len(self.kv_labels)} key labels, "
                             f"got sequence lengths {n_q=} {n_kv=}")

    def _ids(self, q_labels: Tensor, kv_labels: Tensor) -> tuple[Tensor, Tensor, int]:
        """Compact label ids ``0 .. U-1`` shared by queries and keys."""
        values, ids = torch.unique(torch.cat([q_labels, kv_labels]), return_inverse=True)
        return ids[: len(q_labels)], ids[len(q_labels):], len(values)

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        q_ids, kv_ids, n_labels = self._ids(self.labels, self.kv_labels)
        pairs = torch.bincount(q_ids, minlength=n_labels) @ torch.bincount(kv_ids, minlength=n_labels)
        return int(pairs) / (n_q * n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        q_perm = None if _is_grouped(self.labels) else torch.sort(self.labels, stable=True).indices
        if self.kv_labels is self.labels:
            kv_perm = q_perm
        else:
            kv_perm = None if _is_grouped(self.kv_labels) else torch.sort(self.kv_labels, stable=True).indices
        q_labels = self.labels if q_perm is None else self.labels[q_perm]  # (n_q,) in schedule order
        kv_labels = self.kv_labels if kv_perm is None else self.kv_labels[kv_perm]  # (n_kv,)
        q_ids, kv_ids, n_labels = self._ids(q_labels, kv_labels)
        q_bounds, kv_bounds = uniform_bounds(n_q, tile_q), uniform_bounds(n_kv, tile_kv)
        n_qt, n_kt = len(q_bounds) - 1, len(kv_bounds) - 1
        q_tile, kv_tile = torch.arange(n_q) // tile_q, torch.arange(n_kv) // tile_kv

        def tile_span(ids, tile, n_tiles):
            """Per label its first and last tile (each label is one run), and per tile its label if uniform."""
            first = torch.full((n_labels,), n_tiles).scatter_reduce(0, ids, tile, "amin")
            last = torch.full((n_labels,), -1).scatter_reduce(0, ids, tile, "amax")
            lowest = torch.full((n_tiles,), n_labels).scatter_reduce(0, tile, ids, "amin")
            highest = torch.full((n_tiles,), -1).scatter_reduce(0, tile, ids, "amax")
            return first, last, torch.where(lowest == highest, lowest, -1)

        q_first, q_last, q_uniform = tile_span(q_ids, q_tile, n_qt)  # (U,), (U,), (n_qt,)
        kv_first, kv_last, kv_uniform = tile_span(kv_ids, kv_tile, n_kt)
        both = (q_last >= 0) & (kv_last >= 0)  # labels carried by queries and keys
        # each shared label visits the rectangle of tiles [q_first, q_last] x [kv_first, kv_last]: paint the
        # rectangles with a 2-D difference array
        rows0, rows1, cols0, cols1 = q_first[both], q_last[both] + 1, kv_first[both], kv_last[both] + 1
        diff = torch.zeros(n_qt + 1, n_kt + 1, dtype=torch.int32)
        ones = torch.ones_like(rows0, dtype=torch.int32)
        for r, c, sign in [(rows0, cols0, 1), (rows0, cols1, -1), (rows1, cols0, -1), (rows1, cols1, 1)]:
            diff.index_put_((r, c), sign * ones, accumulate=True)
        visited = diff.cumsum(0).cumsum(1)[:n_qt, :n_kt] > 0  # (n_qt, n_kt)
        full = (q_uniform[:, None] == kv_uniform[None, :]) & (q_uniform[:, None] >= 0)
        states = torch.where(full, 2, torch.where(visited, 1, 0)).to(torch.int8)
        return schedule_from_states(n_q, n_kv, q_bounds, kv_bounds, states, q_perm, kv_perm)

    def __repr__(self):
        if self.kv_labels is self.labels:
            return f"Segments({brief(self.labels)})"
        return f"Segments({brief(self.labels)}, kv_labels={brief(self.kv_labels)})"

    def __eq__(self, other):
        return (isinstance(other, Segments) and torch.equal(self.labels, other.labels)
                and torch.equal(self.kv_labels, other.kv_labels))

    def __hash__(self):
        return hash(("Segments", tuple(self.labels.tolist()), tuple(self.kv_labels.tolist())))


class KeyMask(Pattern):
    """Every query may attend key ``j`` iff ``keep[j]`` (key padding: ``pattern & KeyMask(keep)``).

    ``keep``: 1-D bool, one per key (``n_kv = len(keep)``); any number of queries. Tile schedule: uniform tiles;
    every query tile visits the key tiles holding a kept key, full where all their keys are kept.
    """

    key_only = True  # depends on the key alone: Intersection takes its tiling from the other parts

    def __init__(self, keep):
        self.keep = as_vector("keep", keep, "bool")
        self._device_copies: dict = {}

    def mask(self, q_idx, kv_idx, head=None):
        device = kv_idx.device
        if device not in self._device_copies:
            self._device_copies[device] = self.keep.to(device)
        return torch.ones_like(q_idx, dtype=torch.bool) & self._device_copies[device][kv_idx]

    def check(self, n_q, n_kv):
        super().check(n_q, n_kv)
        if n_kv != len(self.keep):
            raise ValueError(f"KeyMask has {len(self.keep)} keys, got {n_kv=}")

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        return int(self.keep.sum()) / n_kv

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        q_bounds, kv_bounds = uniform_bounds(n_q, tile_q), uniform_bounds(n_kv, tile_kv)
        kept_before = torch.cat([torch.zeros(1, dtype=torch.long), self.keep.long().cumsum(0)])  # (n_kv + 1,)
        kept = kept_before[kv_bounds[1:]] - kept_before[kv_bounds[:-1]]  # (n_kt,) kept keys per tile
        tiles = torch.nonzero(kept > 0)[:, 0]  # (V,) the same for every query tile
        full = kept[tiles] == kv_bounds.diff()[tiles]
        n_qt = len(q_bounds) - 1
        return TileSchedule(n_q, n_kv, q_bounds, kv_bounds, tiles.expand(n_qt, -1).contiguous(),
                            full.expand(n_qt, -1).contiguous())

    def __repr__(self):
        return f"KeyMask({brief(self.keep)})"

    def __eq__(self, other):
        return isinstance(other, KeyMask) and torch.equal(self.keep, other.keep)

    def __hash__(self):
        return hash(("KeyMask", tuple(self.keep.tolist())))
