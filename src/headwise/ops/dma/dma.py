"""Dynamic Mask Attention's sparse attention for a given per-key bias (Shi et al., 2025, "Trainable Dynamic Mask
Sparse Attention"): the fast path :func:`dma_attention`, ``O(N (w + chunk) D)``. The selection
(:mod:`headwise.ops.selection.tokens`: ``dma_blocks``, ``dma_block_keep``) is not differentiated; the attention
over the kept keys is (q, k, v and the bias ``z``). The reference is :mod:`headwise.ops.dma.naive`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from headwise.checks import check_positive_int
from headwise.core.blocksparse import extension
from headwise.core.checks import check_qkv, default_scale
from headwise.core.selected import MAX_OWN_BLOCK, candidate_attention
from headwise.ops.selection.tokens import dma_block_keep, dma_blocks, dma_key_rank
from headwise.ops.topk.topk import check_causal_lengths, expand_heads

__all__ = ["dma_attention", "check_dma_inputs"]

DMA_ELEMS = 1 << 25  # candidate score entries per call of the gathered-SDPA path of dma_attention


def check_dma_inputs(q: Tensor, k: Tensor, v: Tensor, z: Tensor, window, causal, scale) -> None:
    """The arguments of :func:`dma_attention` (and its reference): q, k, v as for attention, ``causal`` a bool
    (with as many queries as keys), ``window`` a positive int, ``z`` floating point ``[B, H_kv, M]``."""
    check_qkv(q, k, v, None, scale)
    check_causal_lengths(q, k, causal)
    check_positive_int("window", window)
    B, H_kv, M = k.shape[0], k.shape[1], k.shape[2]
    if not isinstance(z, Tensor) or not z.is_floating_point() or tuple(z.shape) != (B, H_kv, M):
        got = (z.dtype, tuple(z.shape)) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"z must be a floating-point tensor [B, H_kv, M] = {[B, H_kv, M]}, got {got}")


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
                  scale: float | None = None, *, chunk: int = 512) -> Tensor:
    r"""Dynamic Mask Attention's sparse attention ("Trainable Dynamic Mask Sparse Attention", Shi et al., 2025)
    for a given per-key bias ``z`` (the ``"dma"`` variant computes it from the values).

    .. math::

        o_i = \sum_{j \in S_i} \mathrm{softmax}_{j \in S_i}\big(\mathrm{scale}\; q_i \cdot k_j + z_j\big)\, v_j,
        \qquad S_i = \mathrm{top}_w\{ z_j : j \le i \}\ (\text{causal}),\quad
        S_i = \mathrm{top}_w\{ z_j \}\ (\text{otherwise})

    ties to the lower key index. q ``[B, H, N, D]``, k ``[B, H_kv, M, D]``, v ``[B, H_kv, M, Dv]``, z
    ``[B, H_kv, M]`` (one bias per key/value head; grouped query heads share its selection) -> ``[B, H, N, Dv]``.
    Gradients reach q, k, v and z (through the kept scores); the selection is not differentiated.

    Algorithm: non-causal, every query keeps the same ``w`` keys: one gather and one dense attention over them.
    Causal (``N == M``): the bias depends on the key only, so the threshold of query ``i`` (the ``w``-th best bias
    among ``0..i``) never decreases with ``i``, and the keys any query of the chunk ``a .. a + chunk - 1`` keeps
    are among the ``w`` best keys before ``a`` and the chunk's own keys (:func:`headwise.ops.selection.tokens.dma_blocks`).
    On CPU with the compiled extension this is :func:`headwise.core.selected.candidate_attention`: the kept
    prefix keys of a query are a leading run of its chunk's best-first list (a per-row bound), the own keys an
    element mask, and the bias enters as one more key column (``[q, 1/scale] . [k, z] * scale = scale q.k + z``).
    Elsewhere each chunk gathers its ``w + chunk`` candidates for one batched SDPA call whose additive mask is
    ``z_j`` on kept candidates and ``-inf`` elsewhere. Either way the work is ``O(N (w + chunk) D)`` instead of
    ``O(N^2 D)``; ``chunk`` (query tokens per block of the causal path, default 512; formerly ``block``) trades
    gather overhead against wasted candidates and changes speed only. ``w >= N`` is full (causal) attention with
    the bias added. The reference is :func:`headwise.ops.dma.naive_dma_attention`.

    Example:
        >>> import torch
        >>> from headwise.ops.dma import dma_attention
        >>> q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
        >>> dma_attention(q, k, v, torch.randn(1, 2, 50), window=8, chunk=16).shape
        torch.Size([1, 4, 50, 8])
    """
    check_dma_inputs(q, k, v, z, window, causal, scale)
    check_positive_int("chunk", chunk)
    B, H, N, _ = q.shape
    M = k.shape[2]
    sc = default_scale(q, scale)
    z = z.to(q.dtype)
    k, v, z = expand_heads(k, H), expand_heads(v, H), expand_heads(z, H)  # (B, H, M, D), (B, H, M)
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
    sel = dma_blocks(z.detach(), window, min(chunk, N))
    Bq, W = sel.block, sel.window
    nb = sel.prefix.shape[2]
    if q.device.type == "cpu" and extension() is not None and Bq <= MAX_OWN_BLOCK:
        n_prefix, keep_own = dma_block_keep(sel, 0, nb)  # (B, H, nb, Bq), (B, H, nb, Bq, Bq)
        return candidate_attention(*bias_column(), v, sel.prefix, n_prefix.view(B, H, nb * Bq)[:, :, :N], keep_own,
                                   block=Bq, scale=sc)
    pad = nb * Bq - N
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, H, nb*Bq, .)
    zp = F.pad(z, (0, pad))  # (B, H, nb*Bq)
    per_call = max(1, DMA_ELEMS // (B * H * Bq * (W + Bq)))  # query blocks per SDPA call
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, z))
    outs = []
    for first in range(0, nb, per_call):
        f = partial(_dma_blocks_chunk, sel=sel, first=first, last=min(nb, first + per_call), scale=sc)
        outs.append(checkpoint(f, qp, kp, vp, zp, use_reentrant=False) if grad else f(qp, kp, vp, zp))
    return torch.cat(outs, dim=2)[:, :, :N]  # (B, H, N, Dv)
