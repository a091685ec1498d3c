"""Attention over the keys a per-query selection keeps: :func:`keep_attention` (any boolean selection, or one
computed from each chunk of scores) and :func:`topk_attention` (each query's ``topk`` best-scoring keys).

Queries are processed chunk by chunk and each chunk is recomputed in the backward, so memory stays
``O(chunk x M)``. The selection is not differentiated; the attention over the kept keys is. The references are in
:mod:`headwise.ops.topk.naive`. Top-k attention (``"topk"``) and Sparsifiner (``"sparsifiner"``) run on it.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from headwise.checks import check_bool, check_positive_int
from headwise.core.checks import check_qkv, default_scale
from headwise.core.reference import masked_softmax
from headwise.ops.selection.tokens import topk_mask

__all__ = ["keep_attention", "topk_attention", "causal_rows", "check_causal_lengths", "expand_heads", "gqa_scores"]

CHUNK_ELEMS = 1 << 24  # score entries per query chunk of keep_attention / topk_attention (64 MiB in fp32)


def causal_rows(i0: int, i1: int, m: int, device) -> Tensor:
    """``[i1 - i0, m]`` bool: query ``i`` (``i0 <= i < i1``) may see key ``j <= i``."""
    return torch.arange(i0, i1, device=device)[:, None] >= torch.arange(m, device=device)


def check_causal_lengths(q: Tensor, k: Tensor, causal: bool) -> None:
    """``causal`` is a bool, and causal attention has as many queries as keys."""
    check_bool("causal", causal)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")


def expand_heads(x: Tensor, H: int) -> Tensor:
    """Key/value-head tensor ``[B, H_kv, ...]`` -> ``[B, H, ...]`` (query head ``h`` reads ``h // (H / H_kv)``);
    ``x`` itself when ``H_kv == H``."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def gqa_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Dense scaled scores ``[B, H, N, M]`` of q ``[B, H, N, D]`` and k ``[B, H_kv, M, D]`` (GQA by head index)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, M, D)
    return q @ k.transpose(-1, -2) * scale  # (B, H, N, M)


def _keep_chunk(qc: Tensor, k: Tensor, v: Tensor, *, keep: Tensor | Callable, i0: int, scale: float) -> Tensor:
    B, H, n, D = qc.shape
    H_kv, M = k.shape[1], k.shape[2]
    G = H // H_kv
    s = (qc.reshape(B, H_kv, G, n, D) @ k[:, :, None].transpose(-1, -2)) * scale  # (B, H_kv, G, n, M)
    s = s.reshape(B, H, n, M)
    kc = keep(s.detach(), i0, i0 + n) if callable(keep) else keep[:, :, i0:i0 + n]  # (B, H, n, M) bool
    p, _ = masked_softmax(s, kc)  # (B, H, n, M); rows with no key -> zeros
    o = p.reshape(B, H_kv, G, n, M) @ v[:, :, None]  # (B, H_kv, G, n, Dv)
    return o.reshape(B, H, n, v.shape[-1])


def keep_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor | Callable[[Tensor, int, int], Tensor], *,
                   scale: float | None = None, chunk: int | None = None) -> Tensor:
    """Softmax attention restricted per query to the keys ``keep`` marks.

    ``keep``: bool ``[B, H, N, M]`` (broadcastable in B and H), or a callable ``keep(scores, i0, i1)`` returning
    the bool mask ``[B, H, i1 - i0, M]`` of queries ``i0 .. i1 - 1`` from their (detached) scaled scores -- a
    selection by score such as top-k. q ``[B, H, N, D]``, k ``[B, H_kv, M, D]``, v ``[B, H_kv, M, Dv]`` ->
    ``[B, H, N, Dv]``; rows with no key give zeros. Queries are processed ``chunk`` at a time (default: about
    2^24 score entries) and each chunk is recomputed in the backward, so memory stays ``O(chunk x M)``. The
    reference is :func:`headwise.core.reference.masked_attention` (or, row by row,
    :func:`headwise.ops.topk.naive.rowwise_attention`).

    Example:
        >>> import torch
        >>> from headwise.ops.topk import keep_attention
        >>> q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
        >>> keep = torch.rand(1, 2, 5, 6) < 0.5
        >>> keep_attention(q, k, v, keep, chunk=2).shape
        torch.Size([1, 2, 5, 4])
    """
    check_qkv(q, k, v, None, scale)
    B, H, N, _ = q.shape
    M = k.shape[2]
    if chunk is None:
        chunk = max(1, CHUNK_ELEMS // (B * H * M))
    check_positive_int("chunk", chunk)
    if isinstance(keep, Tensor):
        if keep.dtype != torch.bool or keep.dim() != 4 or keep.shape[2:] != (N, M):
            raise ValueError(f"keep must be a bool tensor [B, H, N, M] = {[B, H, N, M]}, got "
                             f"{keep.dtype} {tuple(keep.shape)}")
        keep = keep.expand(B, H, N, M)
    elif not callable(keep):
        raise TypeError(f"keep must be a bool tensor or a callable, got {type(keep).__name__}")
    sc = default_scale(q, scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for i0 in range(0, N, chunk):
        f = partial(_keep_chunk, keep=keep, i0=i0, scale=sc)
        qc = q[:, :, i0:i0 + chunk]  # (B, H, n, D)
        outs.append(checkpoint(f, qc, k, v, use_reentrant=False) if grad else f(qc, k, v))
    return torch.cat(outs, dim=2)  # (B, H, N, Dv)


def topk_attention(q: Tensor, k: Tensor, v: Tensor, topk: int, *, causal: bool = False, scale: float | None = None,
                   chunk: int | None = None) -> Tensor:
    r"""Top-k attention: each query attends to its ``topk`` highest-scoring keys only.

    .. math::

        o_i = \sum_{j \in T_i} \mathrm{softmax}_{j \in T_i}(s_{ij})\, v_j,\qquad
        s_{ij} = \mathrm{scale}\; q_i \cdot k_j,\qquad T_i = \mathrm{top}_k\{ s_{ij} : j \text{ allowed} \}

    (allowed: ``j <= i`` when ``causal``). The scores are dense (``O(N M)`` work) but computed chunk by chunk of
    queries, so memory is ``O(chunk x M)`` forward and backward. Ties: the lower key index wins. ``topk >= M``
    (or ``>= i + 1`` for causal query ``i``) is full (causal) attention. Shapes as :func:`keep_attention`; the
    reference is :func:`headwise.ops.topk.naive_topk_attention`.

    Example:
        >>> import torch
        >>> from headwise.ops.topk import topk_attention
        >>> q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
        >>> topk_attention(q, k, v, 3, causal=True).shape
        torch.Size([1, 4, 9, 8])
    """
    check_positive_int("topk", topk)
    check_qkv(q, k, v, None, scale)
    check_causal_lengths(q, k, causal)
    M = k.shape[2]

    def keep(s: Tensor, i0: int, i1: int) -> Tensor:
        return topk_mask(s, topk, causal_rows(i0, i1, M, s.device) if causal else None)

    return keep_attention(q, k, v, keep, scale=scale, chunk=chunk)
