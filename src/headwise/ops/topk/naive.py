"""References of the keep / top-k attention: dense scores, the selection as a dense mask, materialized softmax
(:func:`naive_topk_attention`), and the same attention written out one query row at a time
(:func:`rowwise_attention`, the ground truth the references themselves are checked against)."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.checks import check_positive_int
from headwise.core.checks import check_qkv, default_scale
from headwise.core.reference import masked_attention
from headwise.ops.selection.tokens import topk_mask
from headwise.ops.topk.topk import causal_rows, check_causal_lengths, gqa_scores

__all__ = ["naive_topk_attention", "rowwise_attention"]


def naive_topk_attention(q: Tensor, k: Tensor, v: Tensor, topk: int, *, causal: bool = False,
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference for :func:`headwise.ops.topk.topk_attention`: dense scores, the top-k as a dense mask,
    materialized softmax. Returns ``(out [B, H, N, Dv], lse [B, H, N])``."""
    check_positive_int("topk", topk)
    check_qkv(q, k, v, None, scale)
    check_causal_lengths(q, k, causal)
    N, M = q.shape[2], k.shape[2]
    s = gqa_scores(q, k, default_scale(q, scale)).detach()  # (B, H, N, M)
    mask = topk_mask(s, topk, causal_rows(0, N, M, q.device) if causal else None)
    return masked_attention(q, k, v, mask, scale)


def rowwise_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, bias: Tensor | None = None,
                      scale: float | None = None) -> Tensor:
    """``softmax(scale q k^T + bias | keep) v`` written out one ``(b, h, i)`` row at a time (GQA by head index).

    q ``[B, H, N, D]``, k ``[B, H_kv, M, D]``, v ``[B, H_kv, M, Dv]``, keep bool ``[B, H, N, M]``, bias (a
    per-key additive bias, as DMA's ``z``) ``[B, H_kv, M]`` or None -> ``[B, H, N, Dv]``; a row needs at least one
    kept key. Slow (Python loops): for tests at small sizes.

    Example:
        >>> import torch
        >>> q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
        >>> keep = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
        >>> rowwise_attention(q, k, v, keep)[0, 0, 0].allclose(v[0, 0, 0])  # the first row sees key 0 only
        True
    """
    B, H, N, D = q.shape
    G = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype, device=q.device)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = torch.nonzero(keep[b, h, i]).flatten()
                s = k[b, h // G, keys] @ q[b, h, i] * scale
                if bias is not None:
                    s = s + bias[b, h // G, keys]
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // G, keys]
    return out
