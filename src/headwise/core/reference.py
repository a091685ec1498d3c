"""The ground truth: materialized scores, a dense boolean mask, softmax. Readable, O(N^2) memory, float64-ready."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.checks import default_scale, lse_dtype
from headwise.patterns.base import Pattern


def naive_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None = None, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + mask) v with fully-masked rows set to zero; returns ``(out, lse)``.

    Shapes: q ``[B, H, N, D]``, k ``[B, H_kv, M, D]``, v ``[B, H_kv, M, Dv]`` -> out ``[B, H, N, Dv]``,
    lse ``[B, H, N]`` (``-inf`` on fully-masked rows).
    """
    mask = None if pattern is None else pattern.dense_mask(q.shape[2], k.shape[2], device=q.device)  # (H or 1, N, M)
    return masked_attention(q, k, v, mask, scale)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`naive_attention` with an explicit boolean ``mask`` broadcastable to ``[B, H, N, M]`` (True = attend)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, M, D)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, M, Dv)
    acc = lse_dtype(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * default_scale(q, scale)  # (B, H, N, M)
    p, lse = masked_softmax(s, mask)  # (B, H, N, M), (B, H, N)
    out = torch.matmul(p, v.to(acc)).to(q.dtype)  # (B, H, N, Dv)
    return out, lse


def masked_softmax(s: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(softmax(s | mask), logsumexp(s | mask))`` over the last dim; rows with no allowed entry give zero
    probabilities and ``lse = -inf`` (never NaN). ``mask`` (True = keep) broadcasts to ``s``."""
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (...,)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])  # zero rows stay zero
    return p, lse
