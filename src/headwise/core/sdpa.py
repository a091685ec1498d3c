"""Dense ``scaled_dot_product_attention`` with the pattern's mask (materialized as a boolean [H or 1, N, M])."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.core.checks import default_scale
from headwise.core.reference import masked_attention
from headwise.patterns.base import Causal, Full, Pattern


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, scale: float | None, return_lse: bool):
    B, H, N, _ = q.shape
    M = k.shape[2]
    scale = default_scale(q, scale)
    if isinstance(pattern, Full):
        pattern = None
    is_causal = isinstance(pattern, Causal) and pattern.offset == 0 and N <= M
    mask = None
    if pattern is not None and not is_causal:
        mask = pattern.dense_mask(N, M, device=q.device)  # (H or 1, N, M)
    if return_lse:
        # the flash kernel returns the log-sum-exp; it has no GQA broadcast, so expand k and v
        groups = H // k.shape[1]
        ke = k.repeat_interleave(groups, dim=1) if groups > 1 else k  # (B, H, M, D)
        ve = v.repeat_interleave(groups, dim=1) if groups > 1 else v  # (B, H, M, Dv)
        # the fused kernel's lse has no gradient: with autograd on, the (O(N^2)-memory) math path
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if q.device.type == "cpu" and q.shape[-1] == v.shape[-1] and not needs_grad:
            bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, ke, ve, 0.0, is_causal, attn_mask=None if bias is None else bias[None], scale=scale
            )
        else:
            out, lse = _math_with_lse(q, ke, ve, mask, is_causal, scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != H
        )
        lse = None
    if mask is not None:
        empty = ~mask.any(-1)  # (H or 1, N) rows with no key: zero, never NaN
        if bool(empty.any()):
            out = out.masked_fill(empty[None, :, :, None], 0.0)
            if lse is not None:
                lse = lse.masked_fill(empty[None], float("-inf"))
    return out, lse


def _math_with_lse(q, k, v, mask, is_causal, scale):
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()[None]
    return masked_attention(q, k, v, mask, scale)
