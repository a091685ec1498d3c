"""Reference of Dynamic Mask Attention's sparse attention: the selection as a dense mask
(:func:`headwise.ops.selection.tokens.dma_mask`), the bias folded into the dot product exactly, materialized
softmax (:func:`headwise.core.reference.masked_attention`)."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.checks import default_scale
from headwise.core.reference import masked_attention
from headwise.ops.dma.dma import check_dma_inputs
from headwise.ops.selection.tokens import dma_mask
from headwise.ops.topk.topk import expand_heads

__all__ = ["naive_dma_attention"]


def naive_dma_attention(q: Tensor, k: Tensor, v: Tensor, z: Tensor, window: int, causal: bool = True,
                        scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference for :func:`headwise.ops.dma.dma_attention`: the selection as a dense mask
    (:func:`headwise.ops.selection.tokens.dma_mask`), the bias folded into the dot product exactly
    (``[q, 1/scale] . [k, z] * scale = scale q.k + z``), materialized softmax. Returns
    ``(out [B, H, N, Dv], lse [B, H, N])``."""
    check_dma_inputs(q, k, v, z, window, causal, scale)
    H, N = q.shape[1], q.shape[2]
    sc = default_scale(q, scale)
    mask = expand_heads(dma_mask(z.detach(), N, window, causal), H)  # (B, H, N, M)
    qb = torch.cat([q, torch.full_like(q[..., :1], 1 / sc)], dim=-1)  # (B, H, N, D+1)
    kb = torch.cat([k, z[..., None].to(k.dtype)], dim=-1)  # (B, H_kv, M, D+1)
    return masked_attention(qb, kb, v, mask, sc)
