"""A pattern as seen by an attention call that holds only some of its query rows and/or heads."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.patterns import Full, Pattern

__all__ = ["Restricted", "restrict"]


class Restricted(Pattern):
    """``base`` as seen by a call that holds only some of its query rows and/or heads.

    ``rows``: the original query positions of the call's queries (``None``: all, in order). ``heads``: the
    original head ids of the call's heads (``None``: all). Used by :func:`~headwise.ops.head_mixture.gather_head_mixture`
    to keep a pattern exact after the queries of one head were gathered, and by modules that run their heads one
    call at a time (``cascaded_group``).
    """

    def __init__(self, base: Pattern, n_q: int, rows: Tensor | None = None, heads: Tensor | None = None):
        self.base, self.n_q, self.rows = base, n_q, rows
        self.head_ids = heads if base.heads is not None else None
        # one fixed head: the call is head-independent; several: the call's head j is the base's head_ids[j]
        self.heads = None if self.head_ids is None or self.head_ids.numel() == 1 else self.head_ids.numel()

    def check(self, n_q, n_kv):
        expected = self.n_q if self.rows is None else self.rows.numel()
        if n_q != expected:
            raise ValueError(f"restricted pattern holds {expected} query rows, got {n_q=}")
        self.base.check(self.n_q, n_kv)

    def mask(self, q_idx, kv_idx, head=None):
        q = q_idx if self.rows is None else self.rows.to(q_idx.device)[q_idx]
        if self.head_ids is None:
            return self.base.mask(q, kv_idx)
        if self.head_ids.numel() == 1:
            return self.base.mask(q, kv_idx, int(self.head_ids[0]))
        ids = self.head_ids.to(q.device)
        return self.base.mask(q, kv_idx, int(ids[head]) if isinstance(head, int) else ids[head])

    def __repr__(self):
        return f"Restricted({self.base!r}, rows={None if self.rows is None else self.rows.numel()}, heads={self.head_ids})"


def restrict(pattern: Pattern | None, n_q: int, rows: Tensor | None, heads: Tensor, n_heads: int) -> Pattern | None:
    """The pattern for a call on query ``rows`` (``None``: all ``n_q``) of ``heads`` (ids among ``n_heads``); the
    pattern itself where nothing changes (so a plain ``Causal`` keeps the fused causal kernels), ``None`` for full
    attention."""
    if pattern is None or isinstance(pattern, Full):
        return None
    all_heads = pattern.heads is None or (heads.numel() == n_heads and bool((heads == torch.arange(n_heads)).all()))
    if rows is None and all_heads:
        return pattern
    return Restricted(pattern, n_q, rows, heads)
