"""Attention whose keys are restricted per batch element (key padding, per-example key sets).

:class:`~headwise.patterns.KeyMask` holds one mask for the whole batch; :func:`key_masked_attention` takes one
``[B, M]`` mask and runs the backends on it (one dense SDPA call for full attention, otherwise one call per
distinct mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.core.attention import attention
from headwise.patterns.base import Pattern
from headwise.patterns.segments import KeyMask

__all__ = ["key_masked_attention"]


def key_masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, pattern: Pattern | None = None,
                         backend: str = "auto") -> Tensor:
    """Softmax attention with the keys restricted per batch element: ``q`` ``[B, H, N, D]``, ``k, v``
    ``[B, H_kv, M, D]``, ``keep`` ``[B, M]`` bool (True = a usable key), ``pattern`` on top -> ``[B, H, N, D]``.
    An element with no usable key gives zeros.

    Full attention (``pattern`` None) on the ``"auto"``/``"sdpa"`` backends is one dense SDPA call with a
    ``[B, 1, 1, M]`` mask; otherwise one :func:`headwise.attention` call per distinct ``keep`` row, its keys
    restricted by :class:`~headwise.patterns.KeyMask` (the key padding of
    :class:`~headwise.variants.mha.MultiHeadAttention`, the regions of ``shared_kv``)."""
    empty = ~keep.any(-1)  # (B,) elements with no usable key
    if pattern is None and backend in ("auto", "sdpa"):
        # all-masked elements attend to everything (so no NaN reaches the backward) and are zeroed afterwards
        mask = (keep | empty[:, None])[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return out.masked_fill(empty[:, None, None, None], 0.0)  # (B, H, N, D)
    masks, which = torch.unique(keep, dim=0, return_inverse=True)  # (U, M), (B,)
    outs, order = [], []
    for u, keep_u in enumerate(masks):
        idx = (which == u).nonzero().squeeze(1)  # (B_u,)
        p = pattern
        if not bool(keep_u.all()):
            key_mask = KeyMask(keep_u)
            p = key_mask if p is None else p & key_mask
        outs.append(attention(q[idx], k[idx], v[idx], p, backend=backend))  # (B_u, H, N, D)
        order.append(idx)
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs)[torch.argsort(torch.cat(order))]  # (B, H, N, D) in batch order
