"""The log-sum-exp merge: combine attention computed over disjoint key sets into attention over their union."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial results over disjoint key sets.

    ``out_*``: ``[B, H, N, Dv]`` (each normalized over its own keys), ``lse_*``: ``[B, H, N]``.
    Returns ``(out, lse)`` over the union; rows empty in both stay zero with ``lse = -inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)  # (B, H, N)
    safe = torch.where(lse == float("-inf"), 0.0, lse)
    w_a = torch.exp(lse_a - safe)[..., None]  # (B, H, N, 1)
    w_b = torch.exp(lse_b - safe)[..., None]
    out = (w_a * out_a.to(lse.dtype) + w_b * out_b.to(lse.dtype)).to(out_a.dtype)
    return out, lse
