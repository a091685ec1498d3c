"""Reference of HiP: the selected key blocks of each query block as a dense token mask, materialized softmax."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.reference import masked_attention
from headwise.ops.selection.blocks import hip_select

__all__ = ["hip_mask", "naive_hip_attention"]


def hip_mask(q: Tensor, k: Tensor, *, block: int, topk: int, window: int = 2, causal: bool = True) -> Tensor:
    """The token mask ``[B, H, N, N]``: query ``i`` sees key ``j`` when ``j``'s block is among the blocks found for
    ``i``'s query block (and ``j <= i`` when ``causal``)."""
    pos = torch.arange(q.shape[2], device=q.device)  # (N,)
    kv = hip_select(q.detach(), k.detach(), block=block, topk=topk, window=window, causal=causal)  # (B, H, nQB, S)
    rows = kv[:, :, pos // block]  # (B, H, N, S) the key blocks of each query's block
    mask = (rows[..., None, :] == (pos // block)[:, None]).any(-1)  # (B, H, N, N): key j's block is among them
    return mask & (pos[None, :] <= pos[:, None]) if causal else mask


def naive_hip_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 64, topk: int = 8, window: int = 2,
                        causal: bool = True, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference of :func:`headwise.ops.hip.hip_attention`: ``(out [B, H, N, Dv], lse [B, H, N])``."""
    return masked_attention(q, k, v, hip_mask(q, k, block=block, topk=topk, window=window, causal=causal), scale)
