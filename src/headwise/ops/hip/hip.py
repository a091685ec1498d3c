"""HiP attention (Lee et al., 2024) on the block-sparse engine: :func:`~headwise.ops.selection.hip_select` finds
the key blocks of every query block (not differentiated), :func:`headwise.core.selected.block_select_attention`
attends over them. The reference is :mod:`headwise.ops.hip.naive`."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.selected import block_select_attention
from headwise.ops.selection.blocks import hip_select
from headwise.patterns import Causal

__all__ = ["hip_attention"]


def hip_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 64, topk: int = 8, window: int = 2,
                  causal: bool = True, scale: float | None = None, backend: str = "auto",
                  return_selection: bool = False):
    """HiP attention over ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, N, D]`` -> ``[B, H, N, Dv]``.

    Every query block of ``block`` queries attends to its ``window`` sliding-window key blocks and the ``topk``
    key blocks found by the tree search of :func:`~headwise.ops.selection.hip_select` (token-level causal mask when
    ``causal``). ``return_selection`` also returns ``(kv_blocks, None)``.
    """
    with torch.no_grad():
        kv_blocks = hip_select(q.detach(), k.detach(), block=block, topk=topk, window=window, causal=causal)
    out = block_select_attention(q, k, v, kv_blocks, block_q=block, block_kv=block,
                                 pattern=Causal() if causal else None, scale=scale, backend=backend)
    return (out, (kv_blocks, None)) if return_selection else out
