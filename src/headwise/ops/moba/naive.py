"""References of MoBA and VMoBA: the selection as a dense token mask, materialized softmax
(:func:`headwise.core.reference.masked_attention`). Same selection functions as the fast path, so the two agree
exactly; :mod:`headwise.ops.selection` is tested against brute force on its own."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.reference import masked_attention
from headwise.ops.selection.blocks import moba_select, vmoba_partition, vmoba_select

__all__ = ["moba_mask", "vmoba_mask", "naive_moba_attention", "naive_vmoba_attention"]


def moba_mask(q: Tensor, k: Tensor, *, block: int, topk: int, causal: bool = True) -> Tensor:
    """The token mask ``[B, H, N, N]`` of MoBA's selection: query ``i`` sees key ``j`` when ``j``'s block is
    selected for ``i`` (and ``j <= i`` when ``causal``)."""
    N = q.shape[2]
    i, j = torch.arange(N, device=q.device)[:, None], torch.arange(N, device=q.device)[None, :]
    sel = moba_select(q.detach(), k.detach(), block=block, topk=topk, causal=causal)  # (B, H, N, nKB)
    mask = sel.gather(-1, (j // block).expand(*sel.shape[:3], N))  # (B, H, N, N): key j's block chosen for query i
    return mask & (j <= i) if causal else mask


def vmoba_mask(q: Tensor, k: Tensor, *, grid, partition: str = "1d", block=1, selection: str = "threshold",
               scope: str = "head", tau: float = 0.25, topk: int = 3) -> Tensor:
    """The token mask ``[B, H, N, N]`` of VMoBA's selection, in the grid's token order."""
    perm, size = vmoba_partition(grid, partition, block)
    perm = perm.to(q.device)
    sel = vmoba_select(q.detach()[:, :, perm], k.detach()[:, :, perm], block=size, selection=selection, scope=scope,
                       tau=tau, topk=topk)  # (B, H, N, nKB) in block order
    pos = torch.argsort(perm)  # grid token -> its place in block order
    sel = sel[:, :, pos]  # (B, H, N, nKB) in grid order
    return sel.gather(-1, (pos // size).expand(*sel.shape[:3], q.shape[2]))  # key j lies in block pos[j] // size


def naive_moba_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 512, topk: int = 3, causal: bool = True,
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference of :func:`headwise.ops.moba.moba_attention`: ``(out [B, H, N, Dv], lse [B, H, N])``."""
    return masked_attention(q, k, v, moba_mask(q, k, block=block, topk=topk, causal=causal), scale)


def naive_vmoba_attention(q: Tensor, k: Tensor, v: Tensor, *, grid, partition: str = "1d", block=1,
                          selection: str = "threshold", scope: str = "head", tau: float = 0.25, topk: int = 3,
                          scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference of :func:`headwise.ops.moba.vmoba_attention`: ``(out [B, H, N, Dv], lse [B, H, N])``."""
    mask = vmoba_mask(q, k, grid=grid, partition=partition, block=block, selection=selection, scope=scope, tau=tau,
                      topk=topk)
    return masked_attention(q, k, v, mask, scale)
