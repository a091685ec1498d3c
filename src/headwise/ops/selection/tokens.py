"""Content-aware selection of single tokens and keys by score: deterministic top-k per query, Dynamic Mask
Attention's key selection by a per-key bias (dense and per query block), DCAL's token selection by accumulated
attention (attention rollout) and LSceneLLM's dense token selector.

Pure functions: no parameters, no gradients (the papers train through the attention over the chosen keys only,
the choice itself is not differentiated). The attention that uses these selections is in
:mod:`headwise.ops.dma`, :mod:`headwise.ops.topk` (DMA, top-k, Sparsifiner) and :mod:`headwise.variants.glca` (DCAL's GLCA).

Tie-breaking, everywhere and in the brute-force tests: equal scores rank the lower index first (the order of a
stable descending sort). A selection keeps ``min(count, available)`` entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from headwise.checks import check_positive_int as _check_count

__all__ = [
    "top_indices",
    "topk_mask",
    "dma_key_rank",
    "dma_mask",
    "DMABlocks",
    "dma_blocks",
    "dma_block_keep",
    "attention_rollout",
    "rollout_select",
    "dense_token_select",
]


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {name}={value!r}")
    return float(value)


# ---- generic top-k ---------------------------------------------------------------------------------------
def top_indices(scores: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` highest entries along the last dim, best first, ties to the lower index.

    ``scores`` ``[..., n]`` -> int64 ``[..., min(count, n)]``.
    """
    _check_count("count", count)
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]


def topk_mask(scores: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """Boolean mask of the ``k`` highest ``allowed`` entries of every row (last dim), ties to the lower index.

    ``scores`` ``[..., n]``; ``allowed`` bool broadcastable to it (``None``: every entry). A row with fewer than
    ``k`` allowed entries keeps all of them. O(n) per row (a ``topk`` threshold and one cumulative count of the
    entries tied with it), so it runs on chunks of a dense score matrix.
    """
    _check_count("k", k)
    s = scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))
    if k >= s.shape[-1]:
        keep = torch.ones_like(s, dtype=torch.bool)
    else:
        t = s.topk(k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest value
        above = s > t
        tied = s == t
        room = k - above.sum(-1, keepdim=True)  # (..., 1) places left for entries equal to t
        keep = above | (tied & (tied.cumsum(-1) <= room))  # the first `room` tied entries, lowest index first
    return keep if allowed is None else keep & allowed


# ---- Dynamic Mask Attention -------------------------------------------------------------------------------
def dma_key_rank(z: Tensor) -> tuple[Tensor, Tensor]:
    """The order of DMA's key selection: ``z`` ``[B, H, M]`` (the per-key bias, higher = kept first) ->
    ``(rank, order)``, both int64 ``[B, H, M]``: ``order`` lists the keys best first (``z`` descending, ties to the
    lower index) and ``rank[j]`` is the position of key ``j`` in it (0 = best)."""
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices  # (B, H, M)
    arange = torch.arange(z.shape[-1], device=z.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, arange), order


def _check_z(z: Tensor) -> None:
    if not isinstance(z, Tensor) or z.dim() != 3 or not z.is_floating_point() or z.shape[-1] < 1:
        raise ValueError(f"z must be a floating-point tensor [B, H, M] with M >= 1, got "
                         f"{type(z).__name__} {tuple(getattr(z, 'shape', ()))}")


def dma_mask(z: Tensor, n_q: int, window: int, causal: bool = True) -> Tensor:
    """DMA's selection as a dense mask (the reference): query ``i`` keeps the ``window`` best keys by ``z`` among
    the keys it may see (``j <= i`` when ``causal``, all otherwise). ``z`` ``[B, H, M]`` -> bool ``[B, H, n_q, M]``.

    Causal selection needs ``n_q == M`` (self-attention, query ``i`` at position ``i``).
    """
    _check_z(z)
    _check_count("window", window)
    _check_count("n_q", n_q)
    B, H, M = z.shape
    if causal and n_q != M:
        raise ValueError(f"causal DMA selection needs as many queries as keys, got n_q={n_q}, M={M}")
    rank, _ = dma_key_rank(z)
    score = (-rank).to(torch.float64)[:, :, None, :].expand(B, H, n_q, M)  # (B, H, N, M) higher = better
    allowed = None
    if causal:
        i = torch.arange(n_q, device=z.device)
        allowed = i[None, :] <= i[:, None]  # (N, M)
    return topk_mask(score, window, allowed)


@dataclass
class DMABlocks:
    """Causal DMA selection per query block, for :func:`headwise.ops.dma.dma_attention`.

    Query block ``c`` holds queries ``a = c * block`` .. ``a + block - 1``. Because the bias ``z`` depends on the key
    only, the keys any query of the block keeps are among ``prefix[c]`` (the ``window`` best keys before ``a``, best
    first) and the block's own ``block`` keys; :func:`dma_block_keep` says which of them each query keeps.
    """

    block: int  # queries per block
    window: int  # keys kept per query, capped at the sequence length
    rank: Tensor  # int64 [B, H, M]: position of each key in the best-first order (0 = best)
    prefix: Tensor  # int64 [B, H, n_blocks, window]: the best keys before each block, best first; -1 pads
    prefix_rank: Tensor  # int64 [B, H, n_blocks, window]: their ranks, ascending; M on padded slots
    threshold: Tensor | None = None  # int64 [B, H, M]: query i keeps key j <= i iff rank[j] <= threshold[i]


def dma_blocks(z: Tensor, window: int, block: int) -> DMABlocks:
    """Per-block candidates of causal DMA selection (see :class:`DMABlocks`): ``z`` ``[B, H, N]``.

    The best ``window`` keys among ``0..i`` are, for every query ``i`` of the block starting at ``a``, inside the
    best ``window`` keys before ``a`` plus the keys ``a..i``: a key before ``a`` outside that prefix set has
    ``window`` better keys already. So the candidates are ``window + block`` keys per block, and the whole selection
    costs ``O(N (window + block))`` instead of ``O(N^2)``. On CPU the compiled extension finds them in one pass with
    a heap of the ``window`` best keys so far (``O(N log window)``), which also gives every query's threshold
    (``DMABlocks.threshold``); elsewhere a counting pass over ``[B, H, blocks, N]``.
    """
    _check_z(z)
    _check_count("window", window)
    _check_count("block", block)
    B, H, N = z.shape
    W = min(window, N)
    nb = math.ceil(N / block)
    rank, order = dma_key_rank(z)
    ext = _compiled(z)
    if ext is not None:  # one heap pass per (batch, head): thresholds and prefixes, O(N log W)
        threshold, prefix_rank = ext.dma_select(rank.reshape(B * H, N).contiguous(), W, block)
        threshold, prefix_rank = threshold.view(B, H, N), prefix_rank.view(B, H, nb, W)
        best = order.gather(-1, prefix_rank.clamp(max=N - 1).flatten(2)).view_as(prefix_rank)
        prefix = torch.where(prefix_rank < N, best, -1)  # (B, H, nb, W)
        return DMABlocks(block=block, window=W, rank=rank, prefix=prefix, prefix_rank=prefix_rank, threshold=threshold)
    starts = torch.arange(nb, device=z.device) * block  # (nb,)
    before = order[:, :, None, :] < starts[:, None]  # (B, H, nb, N): the t-th best key lies before block c
    slot = before.cumsum(-1) - 1  # position among the keys before the block, best first
    slot = torch.where(before & (slot < W), slot, W)  # the first W of them; the rest go to a dropped column
    prefix = torch.full((B, H, nb, W + 1), -1, dtype=torch.long, device=z.device)
    prefix.scatter_(-1, slot, order[:, :, None, :].expand(B, H, nb, N))
    prefix = prefix[..., :W].contiguous()  # (B, H, nb, W); the dropped column got arbitrary writes
    prefix_rank = torch.where(prefix >= 0, rank.gather(-1, prefix.clamp_min(0).flatten(2)).view_as(prefix), N)
    return DMABlocks(block=block, window=W, rank=rank, prefix=prefix, prefix_rank=prefix_rank)


def _compiled(z: Tensor):
    """The compiled extension for DMA's selection helpers (``dma_select``: a heap pass computing the per-query
    thresholds and per-block prefixes), or None (not CPU, or unavailable: the PyTorch counting path runs)."""
    from headwise.core.blocksparse import extension

    return extension() if z.device.type == "cpu" else None


def dma_block_keep(sel: DMABlocks, first: int, last: int) -> tuple[Tensor, Tensor]:
    """Which candidates each query of blocks ``first .. last - 1`` keeps, for a :class:`DMABlocks` selection.

    Returns ``(n_prefix, keep_local)``: int ``[B, H, n, block]``, the query keeps ``sel.prefix`` slots
    ``0 .. n_prefix - 1``; and bool ``[B, H, n, block, block]`` over the block's own keys (``n = last - first``;
    rows of queries past the end of the sequence repeat the last query's selection, keys past the end are never
    kept).

    For query ``i`` in the block starting at ``a`` and own key ``a <= j <= i``, the number of better keys among
    ``0..i`` is the number of better prefix keys (a sorted search) plus the number of better keys in ``a..i`` (a
    cumulative count over the block); ``j`` is kept when that number is below the window. The kept prefix keys
    are the best ones, so they are a leading run of ``sel.prefix``: its length is the window (or the number of
    keys ``0..i`` when smaller) minus the own keys kept.
    """
    B, H, N = sel.rank.shape
    Bq, W = sel.block, sel.window
    dev = sel.rank.device
    blocks = torch.arange(first, last, device=dev)  # (n,)
    a = blocks * Bq  # (n,) block starts
    r = torch.arange(Bq, device=dev)
    pos = a[:, None] + r  # (n, Bq) positions of the block's queries and own keys
    valid = pos < N
    rank_pad = torch.cat([sel.rank, sel.rank.new_full((B, H, 1), N)], -1)  # rank N for "no key"
    own_rank = rank_pad[:, :, torch.where(valid, pos, N)]  # (B, H, n, Bq) ranks of the own keys (N past the end)
    pre_rank = sel.prefix_rank[:, :, first:last].contiguous()  # (B, H, n, W) ascending
    causal = r[None, :] <= r[:, None]  # (Bq i, Bq j)
    if sel.threshold is not None:  # by the per-query threshold: O(block^2) compares, no counting
        t = sel.threshold[:, :, pos.clamp(max=N - 1)]  # (B, H, n, Bq); past the end: the last query's
        keep_local = causal & valid[:, None, :] & (own_rank[..., None, :] <= t[..., :, None])  # (B, H, n, Bq, Bq)
        n_prefix = torch.searchsorted(pre_rank, t.clamp(max=N - 1), right=True).to(torch.int32)  # ranks <= t
        return n_prefix, keep_local
    better_prefix = torch.searchsorted(pre_rank, own_rank).to(torch.int32)  # (B, H, n, Bq) prefix keys better than j
    better = own_rank[..., None, :] < own_rank[..., :, None]  # (B, H, n, Bq j, Bq j'): j' better than j
    better_own = better.cumsum(-1, dtype=torch.int32).transpose(-1, -2)  # [i, j]: own keys j' <= i better than j
    keep_local = causal & valid[:, None, :] & (better_own < (W - better_prefix)[..., None, :])  # (B, H, n, Bq, Bq)
    seen_own = torch.minimum(pos, torch.tensor(N - 1, device=dev)) - a[:, None] + 1  # (n, Bq) own keys j <= i
    seen = torch.clamp(torch.minimum(a, torch.tensor(W, device=dev))[:, None] + seen_own, max=W)  # (n, Bq)
    n_prefix = seen - keep_local.sum(-1, dtype=torch.int32)  # (B, H, n, Bq) kept prefix keys: slots 0 .. n_prefix - 1
    return n_prefix, keep_local


# ---- DCAL: tokens by accumulated attention ----------------------------------------------------------------
def attention_rollout(maps: Sequence[Tensor]) -> Tensor:
    r"""Attention rollout as DCAL uses it (Abnar and Zuidema, 2020): ``\hat S_i = \bar S_i \bar S_{i-1} \cdots
    \bar S_1`` with ``\bar S = 0.5 S + 0.5 E`` (``S`` the head-averaged attention of a layer, ``E`` the identity),
    accounting for the residual connections.

    ``maps``: the attention probabilities of layers ``1..i``, each ``[B, H, N, N]`` (or ``[B, N, N]`` already
    averaged). Returns ``\hat S_i`` ``[B, N, N]``; row 0 is the class token's accumulated attention, the
    score DCAL ranks tokens by.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one attention map, got maps=[]")
    out = None
    for i, m in enumerate(maps):
        if m.dim() == 4:
            m = m.mean(1)  # (B, N, N)
        if m.dim() != 3 or m.shape[-1] != m.shape[-2]:
            raise ValueError(f"maps[{i}] must be [B, H, N, N] or [B, N, N], got maps[{i}].shape={tuple(m.shape)}")
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        s = 0.5 * m + 0.5 * eye  # (B, N, N)
        out = s if out is None else s @ out
    return out


def rollout_select(scores: Tensor, ratio: float) -> Tensor:
    """DCAL's local-query selection: the ``R = ceil(ratio N)`` tokens with the highest accumulated attention.

    ``scores`` ``[B, N]`` (e.g. ``attention_rollout(maps)[:, 0]``, the class token's row) -> int64 ``[B, R]``, best
    first, ties to the lower index. The paper uses ``ratio`` 0.1 (fine-grained categorization) and 0.3 (re-id).
    """
    ratio = _check_ratio("ratio", ratio)
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[-1] < 1:
        raise ValueError(f"scores must be a tensor [B, N] with N >= 1, got {tuple(getattr(scores, 'shape', ()))}")
    return top_indices(scores.detach(), math.ceil(ratio * scores.shape[-1]))


# ---- LSceneLLM: dense token selector ------------------------------------------------------------------------
def dense_token_select(attn: Tensor, ratio: float, *, query_mask: Tensor | None = None,
                       key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""LSceneLLM's dense token selector ("LSceneLLM: Enhancing Large 3D Scene Understanding Using Adaptive Visual
    Preferences", Zhi et al., 2024): the visual tokens that the instruction attends to most.

    .. math::

        m_j = \frac{1}{|H| |Q|} \sum_{h} \sum_{i \in Q} A_{h, i, j}, \qquad
        \mathrm{selected} = \mathrm{top}_{\lceil \rho\, |K| \rceil}\{ m_j : j \in K \}

    ``attn`` ``[B, H, N_q, N_k]`` (or ``[B, N_q, N_k]``): attention probabilities of the language model from its
    query tokens to its key tokens; ``query_mask`` bool ``[B, N_q]`` picks the instruction tokens ``Q`` (default:
    all rows); ``key_mask`` bool ``[B, N_k]`` picks the candidate (visual) tokens ``K`` (default: all columns);
    ``ratio`` is ``\rho``, the fraction of candidates kept.

    Returns ``(idx, mass)``: int64 ``[B, R]`` selected key positions, most attended first (ties to the lower
    index), ``R = ceil(ratio * max_b |K_b|)``; and the attention mass ``m`` ``[B, N_k]`` (non-candidates at
    ``-inf``). Where an element has fewer than ``R`` candidates the trailing slots are ``-1``.

    Choices made here: the paper reads the attention map of the LLM from the instruction to the coarse scene
    tokens and magnifies the regions of the selected ones; it does not fix how heads and instruction tokens are
    aggregated, so this takes the mean over both, and keeps a fixed fraction of tokens (the magnifier that
    gathers dense features around them is left to the caller).
    """
    ratio = _check_ratio("ratio", ratio)
    if not isinstance(attn, Tensor) or attn.dim() not in (3, 4) or not attn.is_floating_point():
        raise ValueError(f"attn must be a floating-point tensor [B, H, N_q, N_k] or [B, N_q, N_k], got "
                         f"{type(attn).__name__} {tuple(getattr(attn, 'shape', ()))}")
    a = attn.detach()
    if a.dim() == 4:
        a = a.mean(1)  # (B, N_q, N_k)
    B, Nq, Nk = a.shape
    for name, m, n in (("query_mask", query_mask, Nq), ("key_mask", key_mask, Nk)):
        if m is not None and (not isinstance(m, Tensor) or m.dtype != torch.bool or tuple(m.shape) != (B, n)):
            got = (m.dtype, tuple(m.shape)) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"{name} must be a bool tensor [B, {n}] = {[B, n]}, got {got}")
    if query_mask is None:
        mass = a.mean(1)  # (B, N_k)
    else:
        w = query_mask.to(a.dtype)  # (B, N_q)
        mass = (w[:, :, None] * a).sum(1) / w.sum(1, keepdim=True).clamp_min(1)  # (B, N_k)
    if key_mask is not None:
        mass = mass.masked_fill(~key_mask, float("-inf"))
    n_cand = Nk if key_mask is None else int(key_mask.sum(1).max())
    R = math.ceil(ratio * max(n_cand, 1))
    idx = top_indices(mass, R)  # (B, R)
    if key_mask is not None:
        idx = torch.where(key_mask.gather(1, idx), idx, -1)
    return idx, mass
