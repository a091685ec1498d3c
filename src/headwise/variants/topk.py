"""Content-aware sparse attention over single keys: plain top-k attention (``"topk"``), Trainable Dynamic Mask
Sparse Attention (``"dma"``) and Sparsifiner's learned connectivity (``"sparsifiner"``).

Every mechanism has a readable dense reference (``naive_*``: materialized scores, the selection as a dense mask,
:func:`headwise.core.reference.masked_attention`) and a fast path the tests compare with it, forward and
gradients. The selections themselves live in :mod:`headwise.ops.selection.tokens` and are not differentiated; the
attention over the kept keys is (q, k, v and, for DMA, the bias ``z``).

Functional core:

* :func:`keep_attention` -- softmax attention over the keys a boolean ``keep`` (or a callable computing it from a
  chunk of scores) leaves each query, query chunk by query chunk (recomputed in the backward), so memory stays
  ``O(chunk x M)``. Top-k attention and Sparsifiner run on it.
* :func:`topk_attention`, :func:`dma_attention` (block-candidate algorithm, ``O(N (w + block))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from headwise.core.blocksparse import extension
from headwise.core.checks import check_qkv, default_scale
from headwise.core.selected import MAX_OWN_BLOCK, candidate_attention
from headwise.core.reference import masked_attention, masked_softmax
from headwise.ops.selection.tokens import dma_block_keep, dma_blocks, dma_key_rank, dma_mask, topk_mask
from headwise.checks import check_bool, check_positive_int
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = [
    "keep_attention",
    "topk_attention",
    "naive_topk_attention",
    "dma_attention",
    "naive_dma_attention",
    "TopKAttention",
    "DynamicMaskAttention",
    "Sparsifiner",
]

_CHUNK_ELEMS = 1 << 24  # score entries per query chunk of keep_attention / topk_attention (64 MiB in fp32)
_DMA_ELEMS = 1 << 25  # candidate score entries per chunk of query blocks in dma_attention


def _causal_rows(i0: int, i1: int, m: int, device) -> Tensor:
    """``[i1 - i0, m]`` bool: query ``i`` (``i0 <= i < i1``) may see key ``j <= i``."""
    return torch.arange(i0, i1, device=device)[:, None] >= torch.arange(m, device=device)


def _check_causal_lengths(q: Tensor, k: Tensor, causal: bool) -> None:
    check_bool("causal", causal)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")


# ---- the functional core ------------------------------------------------------------------------------------
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
    2^24 score entries) and each chunk is recomputed in the backward, so memory stays ``O(chunk x M)``.
    """
    check_qkv(q, k, v, None, scale)
    B, H, N, _ = q.shape
    M = k.shape[2]
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMS // (B * H * M))
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


# ---- top-k attention ------------------------------------------------------------------------------------------
def topk_attention(q: Tensor, k: Tensor, v: Tensor, topk: int, *, causal: bool = False, scale: float | None = None,
                   chunk: int | None = None) -> Tensor:
    r"""Top-k attention: each query attends to its ``topk`` highest-scoring keys only.

    .. math::

        o_i = \sum_{j \in T_i} \mathrm{softmax}_{j \in T_i}(s_{ij})\, v_j,\qquad
        s_{ij} = \mathrm{scale}\; q_i \cdot k_j,\qquad T_i = \mathrm{top}_k\{ s_{ij} : j \text{ allowed} \}

    (allowed: ``j <= i`` when ``causal``). The scores are dense (``O(N M)`` work) but computed chunk by chunk of
    queries, so memory is ``O(chunk x M)`` forward and backward. Ties: the lower key index wins. ``topk >= M``
    (or ``>= i + 1`` for causal query ``i``) is full (causal) attention. Shapes as :func:`keep_attention`.
    """
    check_positive_int("topk", topk)
    check_qkv(q, k, v, None, scale)
    _check_causal_lengths(q, k, causal)
    M = k.shape[2]

    def keep(s: Tensor, i0: int, i1: int) -> Tensor:
        return topk_mask(s, topk, _causal_rows(i0, i1, M, s.device) if causal else None)

    return keep_attention(q, k, v, keep, scale=scale, chunk=chunk)


def _gqa_scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, M, D)
    return q @ k.transpose(-1, -2) * scale  # (B, H, N, M)


def naive_topk_attention(q: Tensor, k: Tensor, v: Tensor, topk: int, *, causal: bool = False,
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference for :func:`topk_attention`: dense scores, the top-k as a dense mask, materialized softmax.
    Returns ``(out, lse)``."""
    check_positive_int("topk", topk)
    check_qkv(q, k, v, None, scale)
    _check_causal_lengths(q, k, causal)
    N, M = q.shape[2], k.shape[2]
    s = _gqa_scores(q, k, default_scale(q, scale)).detach()  # (B, H, N, M)
    mask = topk_mask(s, topk, _causal_rows(0, N, M, q.device) if causal else None)
    return masked_attention(q, k, v, mask, scale)


# ---- Dynamic Mask Attention -----------------------------------------------------------------------------------
def _check_dma(q: Tensor, k: Tensor, v: Tensor, z: Tensor, window, causal, scale) -> None:
    check_qkv(q, k, v, None, scale)
    _check_causal_lengths(q, k, causal)
    check_positive_int("window", window)
    B, H_kv, M = k.shape[0], k.shape[1], k.shape[2]
    if not isinstance(z, Tensor) or not z.is_floating_point() or tuple(z.shape) != (B, H_kv, M):
        got = (z.dtype, tuple(z.shape)) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must be a floating-point tensor [B, H_kv, M] = {[B, H_kv, M]}, got {got}")


def _heads(x: Tensor, H: int) -> Tensor:
    """Key/value-head tensor ``[B, H_kv, ...]`` -> ``[B, H, ...]`` (query head ``h`` reads ``h // (H / H_kv)``)."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def _dma_blocks_chunk(q, k, v, z, *, sel, first: int, last: int, scale: float) -> Tensor:
    """Causal DMA for query blocks ``first .. last - 1``: gather each block's candidates (its prefix keys and its
    own keys), one SDPA call with the bias + selection as an additive mask (batch ``B H``, "heads" the blocks)."""
    B, H, _, D = q.shape
    Bq, W, n = sel.block, sel.window, last - first
    n_prefix, keep_own = dma_block_keep(sel, first, last)  # (B, H, n, Bq), (B, H, n, Bq, Bq)
    idx = sel.prefix[:, :, first:last].clamp_min(0).reshape(B, H, n * W)  # padded slots are never kept
    rows = slice(first * Bq, last * Bq)

    def candidates(x: Tensor) -> Tensor:  # (B, H, Np, F) -> (B*H, n, W + Bq, F)
        pre = x.gather(2, idx[..., None].expand(B, H, n * W, x.shape[-1])).view(B * H, n, W, x.shape[-1])
        return torch.cat([pre, x[:, :, rows].reshape(B * H, n, Bq, x.shape[-1])], dim=2)

    kc, vc = candidates(k), candidates(v)  # (B*H, n, W + Bq, D)
    zc = candidates(z[..., None])[..., 0]  # (B*H, n, W + Bq)
    keep_pre = torch.arange(W, device=q.device) < n_prefix.view(B * H, n, Bq, 1)  # (B*H, n, Bq, W)
    keep = torch.cat([keep_pre, keep_own.view(B * H, n, Bq, Bq)], dim=-1)  # (B*H, n, Bq, W + Bq)
    bias = torch.where(keep, zc[:, :, None, :], float("-inf"))  # (B*H, n, Bq, W + Bq)
    qb = q[:, :, rows].reshape(B * H, n, Bq, D)  # a view: (B, H) merge, blocks become the "heads"
    o = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=bias, scale=scale)  # (B*H, n, Bq, Dv)
    return o.view(B, H, n * Bq, -1)


def dma_attention(q: Tensor, k: Tensor, v: Tensor, z: Tensor, window: int, causal: bool = True,
                  scale: float | None = None, *, block: int = 512) -> Tensor:
    r"""Dynamic Mask Attention's sparse attention ("Trainable Dynamic Mask Sparse Attention", Shi et al., 2025)
    for a given per-key bias ``z`` (:class:`DynamicMaskAttention` computes it from the values).

    .. math::

        o_i = \sum_{j \in S_i} \mathrm{softmax}_{j \in S_i}\big(\mathrm{scale}\; q_i \cdot k_j + z_j\big)\, v_j,
        \qquad S_i = \mathrm{top}_w\{ z_j : j \le i \}\ (\text{causal}),\quad
        S_i = \mathrm{top}_w\{ z_j \}\ (\text{otherwise})

    ties to the lower key index. q ``[B, H, N, D]``, k ``[B, H_kv, M, D]``, v ``[B, H_kv, M, Dv]``, z
    ``[B, H_kv, M]`` (one bias per key/value head; grouped query heads share its selection) -> ``[B, H, N, Dv]``.
    Gradients reach q, k, v and z (through the kept scores); the selection is not differentiated.

    Algorithm: non-causal, every query keeps the same ``w`` keys: one gather and one dense attention over them.
    Causal (``N == M``): the bias depends on the key only, so the threshold of query ``i`` (the ``w``-th best bias
    among ``0..i``) never decreases with ``i``, and the keys any query of the block ``a .. a + block - 1`` keeps
    are among the ``w`` best keys before ``a`` and the block's own keys (:func:`headwise.ops.selection.tokens.dma_blocks`).
    On CPU with the compiled extension this is :func:`headwise.core.selected.candidate_attention`: the kept
    prefix keys of a query are a leading run of its block's best-first list (a per-row bound), the own keys an
    element mask, and the bias enters as one more key column (``[q, 1/scale] . [k, z] * scale = scale q.k + z``).
    Elsewhere each block gathers its ``w + block`` candidates for one batched SDPA call whose additive mask is
    ``z_j`` on kept candidates and ``-inf`` elsewhere. Either way the work is ``O(N (w + block) D)`` instead of
    ``O(N^2 D)``; ``block`` (default 512) trades gather overhead against wasted candidates. ``w >= N`` is full
    (causal) attention with the bias added.
    """
    _check_dma(q, k, v, z, window, causal, scale)
    check_positive_int("block", block)
    B, H, N, _ = q.shape
    M = k.shape[2]
    sc = default_scale(q, scale)
    z = z.to(q.dtype)
    k, v, z = _heads(k, H), _heads(v, H), _heads(z, H)  # (B, H, M, D), (B, H, M)
    if not causal:
        _, order = dma_key_rank(z.detach())
        idx = order[..., :min(window, M)].sort(-1).values  # (B, H, W) kept keys, in position order
        kc = k.gather(2, idx[..., None].expand(*idx.shape, k.shape[-1]))  # (B, H, W, D)
        vc = v.gather(2, idx[..., None].expand(*idx.shape, v.shape[-1]))  # (B, H, W, Dv)
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=z.gather(-1, idx)[:, :, None, :], scale=sc)
    def bias_column():  # scale * ([q, 1/scale] . [k, z]) = scale q.k + z: the bias as one more q/k column
        return (torch.cat([q, q.new_full((*q.shape[:3], 1), 1.0 / sc)], -1),  # (B, H, N, D + 1)
                torch.cat([k, z[..., None]], -1))  # (B, H, N, D + 1)

    if window >= N:  # every query keeps all its keys: causal attention with the bias (an inner step: unobserved)
        return F.scaled_dot_product_attention(*bias_column(), v, is_causal=True, scale=sc)
    sel = dma_blocks(z.detach(), window, min(block, N))
    Bq, W = sel.block, sel.window
    nb = sel.prefix.shape[2]
    if q.device.type == "cpu" and extension() is not None and Bq <= MAX_OWN_BLOCK:
        n_prefix, keep_own = dma_block_keep(sel, 0, nb)  # (B, H, nb, Bq), (B, H, nb, Bq, Bq)
        return candidate_attention(*bias_column(), v, sel.prefix, n_prefix.view(B, H, nb * Bq)[:, :, :N], keep_own,
                                   block=Bq, scale=sc)
    pad = nb * Bq - N
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, nb*Bq, .)
    zp = F.pad(z, (0, pad))  # (B, H, nb*Bq)
    per_chunk = max(1, _DMA_ELEMS // (B * H * Bq * (W + Bq)))
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, z))
    outs = []
    for first in range(0, nb, per_chunk):
        f = partial(_dma_blocks_chunk, sel=sel, first=first, last=min(nb, first + per_chunk), scale=sc)
        outs.append(checkpoint(f, qp, kp, vp, zp, use_reentrant=False) if grad else f(qp, kp, vp, zp))
    return torch.cat(outs, dim=2)[:, :, :N]  # (B, H, N, Dv)


def naive_dma_attention(q: Tensor, k: Tensor, v: Tensor, z: Tensor, window: int, causal: bool = True,
                        scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Reference for :func:`dma_attention`: the selection as a dense mask (:func:`headwise.ops.selection.tokens.dma_mask`),
    the bias folded into the dot product exactly (``[q, 1/scale] . [k, z] * scale = scale q.k + z``), materialized
    softmax. Returns ``(out, lse)``."""
    _check_dma(q, k, v, z, window, causal, scale)
    H, N = q.shape[1], q.shape[2]
    sc = default_scale(q, scale)
    mask = _heads(dma_mask(z.detach(), N, window, causal), H)  # (B, H, N, M)
    qb = torch.cat([q, torch.full_like(q[..., :1], 1 / sc)], dim=-1)  # (B, H, N, D+1)
    kb = torch.cat([k, z[..., None].to(k.dtype)], dim=-1)  # (B, H_kv, M, D+1)
    return masked_attention(qb, kb, v, mask, sc)


# ---- modules ----------------------------------------------------------------------------------------------------
@dataclass
class _ProjectionConfig:
    dim: int  # model width C of the input x [B, N, C] and of the output
    heads: int  # number of query heads H
    kv_heads: int | None = None  # key/value heads H_kv, H % H_kv == 0; None: H
    head_dim: int | None = None  # per-head width D; None: dim // heads
    qkv_bias: bool = True  # bias in the q, k, v projections
    out_bias: bool = True  # bias in the output projection
    dropout: float = 0.0  # dropout probability on the module output, in [0, 1)

    def __post_init__(self):
        base = MultiHeadAttention.Config(dim=self.dim, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                                         qkv_bias=self.qkv_bias, out_bias=self.out_bias, dropout=self.dropout)
        self.kv_heads, self.head_dim, self.dropout = base.kv_heads, base.head_dim, base.dropout

    def projections(self) -> dict:
        return dict(kv_heads=self.kv_heads, head_dim=self.head_dim, qkv_bias=self.qkv_bias, out_bias=self.out_bias,
                    dropout=self.dropout)


class _Projected(nn.Module):
    """A custom attention between the projections of a :class:`MultiHeadAttention` (``self.mha``: ``q_proj``,
    ``kv_proj``, ``out_proj``, output dropout)."""

    def __init__(self, cfg: _ProjectionConfig):
        super().__init__()
        self.config = cfg
        self.dim, self.heads, self.kv_heads, self.head_dim = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.mha = MultiHeadAttention(cfg.dim, cfg.heads, **cfg.projections())

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B, N, C]`` -> q ``[B, H, N, D]``, k, v ``[B, H_kv, M, D]`` (:meth:`MultiHeadAttention.project`)."""
        return self.mha.project(x, context)

    def _finish(self, out: Tensor, B: int, N: int) -> Tensor:
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # (B, N, H*D)
        return self.mha.dropout(self.mha.out_proj(out))  # (B, N, C)


@register("topk")
class TopKAttention(_Projected):
    r"""Top-k attention (the simple content-aware baseline): multi-head attention in which each query keeps only
    its ``topk`` highest-scoring keys (:func:`topk_attention`), with the projections of
    :class:`MultiHeadAttention`.

    Shapes: ``x`` ``[B, N, C]``, ``context`` ``[B, M, C]`` (non-causal only) -> ``[B, N, C]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as :class:`MultiHeadAttention`.
        topk: keys kept per query (default 64); ``topk >= M`` is full attention.
        causal: only keys ``j <= i`` are candidates (default False).

    Choices made here: the scores are computed densely (chunk by chunk of queries) and ties go to the lower key
    index; there is no approximate search.

    Example:
        >>> import torch, headwise
        >>> headwise.create("topk(topk=8, causal=True)", dim=64, heads=4)(torch.randn(2, 50, 64)).shape
        torch.Size([2, 50, 64])
    """

    @dataclass
    class Config(_ProjectionConfig):
        topk: int = 64  # keys kept per query
        causal: bool = False  # restrict the candidates of query i to keys j <= i

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("topk", self.topk)
            check_bool("causal", self.causal)

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0, topk: int = 64,
                 causal: bool = False):
        cfg = self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                          out_bias=out_bias, dropout=dropout, topk=topk, causal=causal)
        super().__init__(cfg)
        self.topk, self.causal = cfg.topk, cfg.causal

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, k, v = self.project(x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        out = topk_attention(q, k, v, self.topk, causal=self.causal)  # (B, H, N, D)
        return self._finish(out, x.shape[0], x.shape[1])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, topk={self.topk}, causal={self.causal}"


@register("dma")
class DynamicMaskAttention(_Projected):
    r"""Dynamic Mask Attention from "Trainable Dynamic Mask Sparse Attention" (Shi et al., 2025).

    A content-aware bias per key, computed from the values, both selects the keys each query attends to and is
    added to their scores:

    .. math::

        z_{h,j} = \exp\big(A_h\, \mathrm{softplus}(v_j W_\Delta + b_\Delta)_h\big),\qquad
        S_i = \mathrm{top}_w\{ z_{h,j} : j \le i \},\qquad
        o_{h,i} = \sum_{j \in S_i} \mathrm{softmax}_{j \in S_i}\big(q_{h,i} \cdot k_{h,j} / \sqrt{D} + z_{h,j}\big)\, v_{h,j}

    ``v_j`` is the concatenation of token ``j``'s values over the key/value heads (``[H_kv D]``), ``W_\Delta``
    ``[H_kv D, H_kv]`` (``dt_proj``) and ``A`` ``[H_kv]`` learnable. The mask is applied before the softmax, so the
    model trains end to end: ``A`` and ``W_\Delta`` get gradients through the bias of the kept keys (the top-w
    choice itself is not differentiated). The attention is :func:`dma_attention` (``O(N (w + block) D)``).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]`` (self-attention).

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as :class:`MultiHeadAttention`
            (``qkv_bias`` also sets the bias ``b_\Delta`` of ``dt_proj``).
        window: keys kept per query ``w`` (the authors' ``keep_window_size``, default 2048).
        causal: decoder attention (default True); False selects the same ``w`` keys for every query.
        bias: ``"exp"`` (default) ``z = exp(A softplus(.))`` as in the paper and the authors' reference code;
            ``"linear"`` ``z = A softplus(.)``, the form the authors' later model code uses "for numerical
            stability".
        block: query block of the causal fast path (default 512; changes speed only).

    Choices made here: ``A`` is initialised from ``N(0, 0.02^2)`` as in the authors' Doge model; ties in ``z`` go
    to the lower key index; with grouped key/value heads (GQA) the query heads of a group share their key head's
    bias and selection, as in the authors' code (one ``A`` and one bias column per key/value head).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("dma(window=16)", dim=64, heads=4, kv_heads=2)
        >>> m(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    BIAS_FORMS = ("exp", "linear")

    @dataclass
    class Config(_ProjectionConfig):
        window: int = 2048  # keys kept per query w (top-w by the value-derived bias)
        causal: bool = True  # decoder attention: query i selects among keys j <= i
        bias: str = "exp"  # "exp": z = exp(A softplus(v W + b)) (paper); "linear": z = A softplus(v W + b)
        block: int = 512  # query block of the causal fast path (speed only)

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("window", self.window)
            check_bool("causal", self.causal)
            check_positive_int("block", self.block)
            if self.bias not in DynamicMaskAttention.BIAS_FORMS:
                raise ValueError(f"bias must be one of {DynamicMaskAttention.BIAS_FORMS}, got bias={self.bias!r}")

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0, window: int = 2048,
                 causal: bool = True, bias: str = "exp", block: int = 512):
        cfg = self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                          out_bias=out_bias, dropout=dropout, window=window, causal=causal, bias=bias, block=block)
        super().__init__(cfg)
        self.window, self.causal, self.bias_form, self.block = cfg.window, cfg.causal, cfg.bias, cfg.block
        self.dt_proj = nn.Linear(cfg.kv_heads * cfg.head_dim, cfg.kv_heads, bias=cfg.qkv_bias)
        self.A = nn.Parameter(torch.randn(cfg.kv_heads) * 0.02)  # (H_kv,)

    def dynamic_bias(self, v: Tensor) -> Tensor:
        """The per-key bias ``z`` ``[B, H_kv, N]`` from the values ``v`` ``[B, H_kv, N, D]``."""
        B, H_kv, N, D = v.shape
        dt = F.softplus(self.dt_proj(v.transpose(1, 2).reshape(B, N, H_kv * D)))  # (B, N, H_kv)
        z = self.A * dt
        return (z.exp() if self.bias_form == "exp" else z).transpose(1, 2)  # (B, H_kv, N)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        z = self.dynamic_bias(v)  # (B, H_kv, N)
        out = dma_attention(q, k, v, z, self.window, self.causal, block=self.block)  # (B, H, N, D)
        return self._finish(out, x.shape[0], x.shape[1])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, window={self.window}, "
                f"causal={self.causal}, bias={self.bias_form!r}")


@register("sparsifiner")
class Sparsifiner(_Projected):
    r"""Sparsifiner's learned, instance-dependent sparse attention ("Sparsifiner: Learning Sparse
    Instance-Dependent Attention for Efficient Vision Transformers", Wei et al., CVPR 2023).

    A low-rank connectivity predictor estimates the attention map; each query keeps its ``budget`` best-connected
    keys and exact attention runs on that mask:

    .. math::

        \hat A = \mathrm{softmax}\Big(\frac{(q W_c^q)\,\big((k W_c^k)^\top P_n\big)}{\sqrt{c}}\Big)\, U_n^\top,\qquad
        M_i = \mathrm{top}_{\mathrm{budget}}(\hat A_i),\qquad
        o_i = \mathrm{softmax}_{j \in M_i}(q_i \cdot k_j / \sqrt{D})\, v_j

    with channel projections ``W_c^{q,k}`` ``[D, c]`` (``c = D / reduce_c``, shared by the heads), a token
    down-projection ``P_n`` ``[N, n]`` (``n = N / reduce_n``) and a sparse up-projection basis ``U_n`` ``[N, n]``;
    ``budget = ceil(keep_rate N)``. The mask is not differentiated; the predictor is trained by
    :meth:`distillation_loss`, which distills the dense attention map into ``\hat A``:

    .. math::

        \mathcal{L}_{\mathrm{distill}} = \sum_{b, h, i, j} \big(\hat A_{b,h,i,j} - \mathrm{sg}[A_{b,h,i,j}]\big)^2,
        \qquad A = \mathrm{softmax}(q k^\top / \sqrt{D})

    (the authors' attention self-distillation / reconstruction loss: ``F.mse_loss(reduction="sum")`` against the
    unmasked attention of this layer, or of a teacher when ``teacher`` is given), over the rows of the non-class
    tokens when ``cls_token``.

    Shapes: ``x`` ``[B, N, C]`` with ``N = tokens`` (the token projections are sized for it) -> ``[B, N, C]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as :class:`MultiHeadAttention`.
        tokens: the number of tokens ``N`` (required; e.g. 197 for ViT-B/16 at 224 px).
        keep_rate: fraction of keys each query keeps (default 0.25, the paper's main setting).
        reduce_n: token reduction of the predictor, ``n = max(1, N // reduce_n)`` (default 8).
        reduce_c: channel reduction of the predictor, ``c = max(1, D // reduce_c)`` (default 2).
        cls_token: token 0 is a class token whose row attends to every key, as in the authors' code (default True).

    Choices made here: the predictor logits are scaled by ``c^{-1/2}`` (the authors' code uses ``H^{-1/2}``); the
    basis is used as learned, without the inference-time magnitude threshold of the authors' code (a threshold of
    0, their default, only takes ``|U|``); ties in ``\hat A`` go to the lower key index. Token pruning, which the
    paper combines with this in some experiments, is not included.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("sparsifiner(tokens=50, keep_rate=0.2)", dim=64, heads=4)
        >>> x = torch.randn(2, 50, 64)
        >>> m(x).shape, m.distillation_loss(x).shape
        (torch.Size([2, 50, 64]), torch.Size([]))
    """

    @dataclass
    class Config(_ProjectionConfig):
        tokens: int | None = None  # the number of tokens N the predictor's token projections are sized for (required)
        keep_rate: float = 0.25  # fraction of keys kept per query: budget = ceil(keep_rate * N)
        reduce_n: int = 8  # token reduction of the predictor: n = max(1, N // reduce_n)
        reduce_c: int = 2  # channel reduction of the predictor: c = max(1, head_dim // reduce_c)
        cls_token: bool = True  # token 0 is a class token whose row attends to every key

        def __post_init__(self):
            super().__post_init__()
            if self.tokens is None:
                raise ValueError("sparsifiner needs tokens= (the fixed number of tokens N), got tokens=None")
            check_positive_int("tokens", self.tokens)
            r = self.keep_rate
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"keep_rate must be a number in (0, 1], got keep_rate={r!r}")
            self.keep_rate = float(r)
            check_positive_int("reduce_n", self.reduce_n)
            check_positive_int("reduce_c", self.reduce_c)
            check_bool("cls_token", self.cls_token)

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0, tokens: int | None = None,
                 keep_rate: float = 0.25, reduce_n: int = 8, reduce_c: int = 2, cls_token: bool = True):
        cfg = self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                          out_bias=out_bias, dropout=dropout, tokens=tokens, keep_rate=keep_rate, reduce_n=reduce_n,
                          reduce_c=reduce_c, cls_token=cls_token)
        super().__init__(cfg)
        N, D = cfg.tokens, cfg.head_dim
        self.tokens, self.cls_token = N, cfg.cls_token
        self.budget = math.ceil(cfg.keep_rate * N)
        n, c = max(1, N // cfg.reduce_n), max(1, D // cfg.reduce_c)
        self.proj_c_q = nn.Linear(D, c)
        self.proj_c_k = nn.Linear(D, c)
        self.proj_n = nn.Parameter(torch.randn(N, n) * 0.02)  # (N, n) token down-projection P_n
        self.basis = nn.Parameter(torch.randn(N, n) * 0.02)  # (N, n) up-projection basis U_n

    def approx_attention(self, q: Tensor, k: Tensor) -> Tensor:
        """The predicted connectivity ``\\hat A`` ``[B, H, N, N]`` from q ``[B, H, N, D]``, k ``[B, H_kv, N, D]``."""
        qr = self.proj_c_q(q)  # (B, H, N, c)
        kr = self.proj_c_k(_heads(k, q.shape[1]))  # (B, H, N, c)
        kd = kr.transpose(-1, -2) @ self.proj_n  # (B, H, c, n)
        coef = torch.softmax(qr @ kd * qr.shape[-1] ** -0.5, dim=-1)  # (B, H, N, n)
        return coef @ self.basis.T  # (B, H, N, N)

    def connectivity_mask(self, q: Tensor, k: Tensor) -> Tensor:
        """The binarized connectivity ``[B, H, N, N]`` bool: each row's ``budget`` best predicted keys."""
        with torch.no_grad():
            mask = topk_mask(self.approx_attention(q, k), self.budget)  # (B, H, N, N)
        if self.cls_token:
            mask[:, :, 0] = True
        return mask

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        if x.shape[1] != self.tokens:
            raise ValueError(f"sparsifiner is sized for tokens={self.tokens}, got x.shape={tuple(x.shape)}")
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._tokens(x)
        out = keep_attention(q, k, v, self.connectivity_mask(q, k))  # (B, H, N, D)
        return self._finish(out, x.shape[0], x.shape[1])

    def distillation_loss(self, x: Tensor, teacher: Tensor | None = None) -> Tensor:
        """``sum (\\hat A - sg[A])^2`` over batch, heads and (non-class) query rows; ``A`` is this layer's dense
        attention map, or ``teacher`` ``[B, H, N, N]`` (e.g. the same layer of a dense teacher model)."""
        q, k, _ = self._tokens(x)
        approx = self.approx_attention(q, k)  # (B, H, N, N)
        if teacher is None:
            teacher = torch.softmax(_gqa_scores(q, k, self.head_dim ** -0.5), dim=-1)  # (B, H, N, N)
        elif not isinstance(teacher, Tensor) or teacher.shape != approx.shape:
            got = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
            raise ValueError(f"teacher must be an attention map [B, H, N, N] = {list(approx.shape)}, got {got}")
        rows = slice(1 if self.cls_token else 0, None)
        return (approx[:, :, rows] - teacher.detach()[:, :, rows]).pow(2).sum()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, tokens={self.tokens}, budget={self.budget}, "
                f"cls_token={self.cls_token}")
