"""Content-aware key-block selection: MoBA gating, VMoBA partitions and global / threshold selection, HiP's tree search.

Pure functions (no parameters, no gradients): they read the projected queries and keys and return which key
blocks each query (or query block) visits, in the form :func:`headwise.core.selected.block_select_attention` takes.
The selection itself is not differentiated (the papers train through the attention over the chosen blocks only).

Two output forms:

* per-query selections, bool ``[B, H, N, n_kv_blocks]`` (MoBA, VMoBA): query ``i`` visits key block ``c``;
  :func:`blocks_from_token_selection` turns them into ``(kv_blocks, row_mask)`` for the engine.
* per-query-block selections, int64 ``kv_blocks`` ``[B, H, n_q_blocks, S]`` with ``-1`` for unused slots (HiP).

Key blocks are ``block`` consecutive tokens (``c * block .. (c + 1) * block - 1``; the last may be shorter). Every
function takes ``q`` ``[B, H, N, D]`` and ``k`` ``[B, H_kv, N, D]`` (self-attention: the query at position ``i`` has
its own block ``i // block``; grouped-query heads read key head ``h // (H / H_kv)``).

Tie-breaking (deterministic, the same in the brute-force tests): equal scores rank the lower block index (MoBA,
HiP: the lower position) first; VMoBA's global selections rank equal entries in query-major order
(query ``i``, block ``c`` -> ``i * n_blocks + c``), lower first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from headwise.ops.selection.tokens import top_indices

__all__ = [
    "VMOBA_PARTITIONS",
    "block_means",
    "moba_select",
    "vmoba_partition",
    "vmoba_layer_partition",
    "vmoba_select",
    "hip_select",
    "blocks_from_token_selection",
]

VMOBA_PARTITIONS = ("1d", "2d", "3d")  # the per-layer cycle of VMoBA: layer l uses VMOBA_PARTITIONS[l % 3]
_EPS = 1e-6  # VMoBA's guard in the min-max normalisation and the mass ratios (as in the authors' code)


# ---- checks and shared pieces ---------------------------------------------------------------------------
def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {name}={value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={value!r}")


def _check_qk(q: Tensor, k: Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor [B, H, N, D], got "
                            f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != D or k.shape[1] < 1 or H % k.shape[1]:
        raise ValueError(f"k must be [B, H_kv, N, D] with H % H_kv == 0 matching q (self-attention), got "
                         f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if N < 1:
        raise ValueError(f"q must have at least one token, got q.shape={tuple(q.shape)}")


def _per_query_head(x: Tensor, heads: int) -> Tensor:
    """``[B, H_kv, ..., F]`` -> ``[B, H, ..., F]``: query head ``h`` reads key head ``h // (H / H_kv)``."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def block_means(k: Tensor, block: int) -> Tensor:
    """Mean key of each block of ``block`` consecutive tokens: ``k`` ``[B, H, M, D]`` -> ``[B, H, ceil(M / block), D]``
    (the last block's mean is over the tokens it has)."""
    _check_int("block", block)
    B, H, M, D = k.shape
    full = M // block  # whole blocks
    means = k[:, :, :full * block].reshape(B, H, full, block, D).mean(3)  # (B, H, full, D)
    if full * block == M:
        return means
    tail = k[:, :, full * block:].mean(2, keepdim=True)  # (B, H, 1, D), the shorter last block
    return torch.cat([means, tail], 2)  # (B, H, nKB, D)


def _first_by_score(score: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` highest entries along the last dim, ties to the lower index: repeated argmax (which
    returns the first maximum; faster for a few) or :func:`~headwise.ops.selection.tokens.top_indices` (a stable sort)."""
    if count > 8:
        return top_indices(score, count)
    score = score.masked_fill(score == float("-inf"), torch.finfo(score.dtype).min)  # below it: the picked ones
    picks = []
    for _ in range(count):
        i = score.argmax(-1, keepdim=True)
        picks.append(i)
        score.scatter_(-1, i, float("-inf"))
    return torch.cat(picks, -1)


def _scatter_true(shape, index: Tensor, keep: Tensor, device) -> Tensor:
    out = torch.zeros(shape, dtype=torch.bool, device=device)
    return out.scatter_(-1, index, keep)


# ---- MoBA -----------------------------------------------------------------------------------------------
def moba_select(q: Tensor, k: Tensor, *, block: int, topk: int, causal: bool = True) -> Tensor:
    r"""MoBA's gating (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs").

    Gate of query ``i`` (head ``h``) for key block ``c``: :math:`s_{ic} = q_i \cdot \bar k_c` with
    :math:`\bar k_c` the mean key of the block (:func:`block_means`). Query ``i`` always selects its own block
    ``i // block`` and, among the other candidate blocks (causal: the blocks before its own; non-causal: every
    other block), the ``topk - 1`` with the highest gate; so ``topk`` counts the own block. Inside the own block
    the caller applies the token-level causal mask.

    Returns a bool ``[B, H, N, ceil(N / block)]``: query ``i`` visits block ``c``. It is the transposed view of a
    contiguous ``[B, H, blocks, N]`` tensor: the gates are computed block-major, so that every step reduces over
    the short block axis across long rows of queries (several times faster than per-query rows of a few blocks),
    and :func:`headwise.core.selected.token_block_attention` takes that layout as it is.
    """
    _check_qk(q, k)
    _check_int("block", block)
    _check_int("topk", topk)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    B, H, N, _ = q.shape
    means = _per_query_head(block_means(k, block), H)  # (B, H, nKB, D)
    n_kb = means.shape[2]
    own = torch.arange(N, device=q.device) // block  # (N,)
    blocks = torch.arange(n_kb, device=q.device)
    valid = blocks[:, None] < own[None, :] if causal else blocks[:, None] != own[None, :]  # (nKB, N)
    score = (means @ q.transpose(-1, -2)).masked_fill_(~valid, float("-inf"))  # (B, H, nKB, N)
    table = torch.zeros(B, H, n_kb + 1, N, dtype=torch.bool, device=q.device)  # row n_kb: "nothing left"
    for _ in range(min(topk - 1, n_kb - 1)):
        best, idx = score.max(dim=2, keepdim=True)  # (B, H, 1, N); the first maximum: ties to the lower block
        table.scatter_(2, idx.masked_fill(best == float("-inf"), n_kb), True)
        score.scatter_(2, idx, float("-inf"))
    table[:, :, own, torch.arange(N, device=q.device)] = True
    return table[:, :, :n_kb].transpose(-1, -2)  # (B, H, N, nKB), a view


# ---- VMoBA ----------------------------------------------------------------------------------------------
def vmoba_layer_partition(layer: int) -> str:
    """VMoBA's layer-wise recurrent partition: layer ``l`` uses ``("1d", "2d", "3d")[l % 3]``."""
    _check_int("layer", layer, 0)
    return VMOBA_PARTITIONS[layer % 3]


def vmoba_partition(grid: tuple[int, int, int], partition: str, block) -> tuple[Tensor, int]:
    """The token order and block size of a VMoBA partition of a ``(T, H, W)`` video grid (tokens row-major).

    * ``"1d"``: ``block`` = frames per block (int): blocks of ``block * H * W`` consecutive tokens (the last may be
      shorter); the order is unchanged.
    * ``"2d"``: ``block = (bh, bw)`` dividing ``(H, W)``: each block is a ``bh x bw`` spatial patch through all
      ``T`` frames (``T * bh * bw`` tokens).
    * ``"3d"``: ``block = (bt, bh, bw)`` dividing ``(T, H, W)``: ``bt x bh x bw`` spatio-temporal cubes.

    Returns ``(perm, block_tokens)``: ``x[:, perm]`` puts the tokens in block order, so block ``c`` is the tokens
    ``c * block_tokens ..`` of the permuted sequence (``argsort(perm)`` undoes it).
    """
    if partition not in VMOBA_PARTITIONS:
        raise ValueError(f"unknown {partition=}; valid: {', '.join(map(repr, VMOBA_PARTITIONS))}")
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"grid must be (T, H, W), got {grid=!r}")
    for i, g in enumerate(grid):
        _check_int(f"grid[{i}]", g)
    T, Hh, W = grid
    ids = torch.arange(T * Hh * W).view(T, Hh, W)
    if partition == "1d":
        _check_int("block (1d: frames per block)", block)
        if block > T:
            raise ValueError(f"1d block of {block} frames exceeds the {T} frames of {grid=}")
        return ids.reshape(-1), block * Hh * W
    dims = 2 if partition == "2d" else 3
    if not isinstance(block, (tuple, list)) or len(block) != dims:
        raise ValueError(f"a {partition} block is a tuple of {dims} ints, got {block=!r}")
    for i, b in enumerate(block):
        _check_int(f"block[{i}]", b)
    sizes = (T, *block) if dims == 2 else tuple(block)
    if any(s % b for s, b in zip(grid, sizes)):
        raise ValueError(f"{partition} {block=} must divide {grid=} (per dimension)")
    bt, bh, bw = sizes
    perm = ids.view(T // bt, bt, Hh // bh, bh, W // bw, bw).permute(0, 2, 4, 1, 3, 5)  # blocks outer, cube inner
    return perm.reshape(-1), bt * bh * bw


def vmoba_select(q: Tensor, k: Tensor, *, block: int, selection: str = "threshold", scope: str = "head",
                 tau: float = 0.25, topk: int = 3) -> Tensor:
    r"""VMoBA's block selection (Wu et al., 2025, "VMoBA: Mixture-of-Block Attention for Video Diffusion Models").

    ``q``, ``k`` are in block order (:func:`vmoba_partition`), blocks of ``block`` consecutive tokens; non-causal.
    Gates :math:`g_{ic} = q_i \cdot \bar k_c` as in MoBA. Query ``i`` always visits its own block ``i // block``.
    ``scope`` is where the selection competes: ``"head"`` (the paper's *global block selection*: all
    (query, block) pairs of a head compete together) or ``"query"`` (MoBA's per-query selection).

    * ``selection="topk"``: ``"query"``: the own block and the ``topk - 1`` best other blocks of each query;
      ``"head"``: the ``topk * N`` best (query, block) pairs of the head, every own-block pair ranked first (so
      the own blocks are counted in the budget).
    * ``selection="threshold"`` (the paper's threshold-based selection; definition from the authors' code,
      ``_select_threshold_head_global`` / ``_query_head``): in the scope, min-max normalise the gates,
      :math:`\hat g = (g - \min g) / (\max g - \min g)` (denominator 1 when below 1e-6); the own-block pairs are
      selected first and hold the mass fraction :math:`r_0 = \sum_{own} \hat g / (\sum \hat g + 10^{-6})`; the
      other pairs, in descending :math:`\hat g`, are added until their cumulative mass fraction reaches
      :math:`\max(0, \tau - r_0)`, the first pair that reaches it included: so at least one pair beyond the own
      blocks is always selected, and the selected mass fraction is the smallest that reaches ``tau``.

    Returns a bool ``[B, H, N, ceil(N / block)]``.
    """
    _check_qk(q, k)
    _check_int("block", block)
    if selection not in ("threshold", "topk"):
        raise ValueError(f"unknown {selection=}; valid: 'threshold', 'topk'")
    if scope not in ("head", "query"):
        raise ValueError(f"unknown {scope=}; valid: 'head', 'query'")
    if selection == "topk":
        _check_int("topk", topk)
        if scope == "query":
            return moba_select(q, k, block=block, topk=topk, causal=False)
    elif isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau <= 1:
        raise ValueError(f"tau must be a number in [0, 1], got {tau=!r}")
    B, H, N, _ = q.shape
    means = _per_query_head(block_means(k, block), H)  # (B, H, nKB, D)
    n_kb = means.shape[2]
    gate = q @ means.transpose(-1, -2)  # (B, H, N, nKB)
    own = torch.zeros(N, n_kb, dtype=torch.bool, device=q.device)
    own[torch.arange(N, device=q.device), torch.arange(N, device=q.device) // block] = True  # (N, nKB)
    if selection == "topk":  # scope "head": own pairs first, then by gate
        flat = gate.masked_fill(own, float("inf")).reshape(B, H, N * n_kb)
        idx = _first_by_score(flat, min(topk * N, N * n_kb))
        return _scatter_true((B, H, N * n_kb), idx, torch.ones_like(idx, dtype=torch.bool), q.device).view(gate.shape)
    dims = (-2, -1) if scope == "head" else (-1,)
    lo, hi = gate.amin(dims, keepdim=True), gate.amax(dims, keepdim=True)
    denom = hi - lo
    denom = torch.where(denom <= _EPS, torch.ones_like(denom), denom)
    norm = (gate - lo) / denom  # (B, H, N, nKB) in [0, 1]
    total = norm.sum(dims, keepdim=True)
    remain = (tau - (norm * own).sum(dims, keepdim=True) / (total + _EPS)).clamp(min=0)
    others = norm.masked_fill(own, 0.0)
    if scope == "head":
        others, total, remain = others.reshape(B, H, 1, N * n_kb), total.view(B, H, 1, 1), remain.view(B, H, 1, 1)
    values, order = torch.sort(others, dim=-1, descending=True, stable=True)
    reached = values.cumsum(-1) / (total + _EPS) >= remain
    L = values.shape[-1]
    cutoff = torch.where(reached.any(-1, keepdim=True), reached.to(torch.int8).argmax(-1, keepdim=True),
                         torch.full_like(remain, L - 1, dtype=torch.long))
    keep = torch.arange(L, device=q.device) <= cutoff  # sorted positions up to the cutoff
    sel = _scatter_true(others.shape, order, keep, q.device).view(gate.shape)
    return sel | own


# ---- HiP ------------------------------------------------------------------------------------------------
def _hip_window(n_blocks: int, window: int, causal: bool, device) -> tuple[Tensor, Tensor]:
    """First and last key block ``[lo, hi]`` of each query block's sliding window, ``(n_blocks,)`` each."""
    qb = torch.arange(n_blocks, device=device)
    if causal:
        lo, hi = qb - window + 1, qb
    else:
        lo, hi = qb - (window - 1) // 2, qb + window // 2
    return lo.clamp(min=0), hi.clamp(max=n_blocks - 1)


def hip_select(q: Tensor, k: Tensor, *, block: int, topk: int, window: int = 1, causal: bool = True) -> Tensor:
    r"""HiP's hierarchical top-k key-block search (Lee et al., 2024, "HiP Attention: Sparse Sub-Quadratic
    Attention with Hierarchical Attention Pruning"), implemented from the paper's description of the algorithm.

    Per (batch, head) and query block ``b`` (``block`` queries; key blocks of the same size):

    * the sliding window: key blocks ``b - window + 1 .. b`` (causal) or ``b - (window - 1) // 2 .. b + window // 2``
      (non-causal), clipped to the sequence, are always visited;
    * the other key blocks are the candidates, positions ``0 .. C - 1`` in order (causal: the blocks before the
      window; non-causal: the blocks left of the window, then those right of it). With ``C <= topk`` every
      candidate is visited. Otherwise the candidates are split into ``topk`` nodes (node ``j`` = positions
      ``floor(j C / k) .. floor((j + 1) C / k) - 1``) and, until every node is a single block, each node is
      halved (``[lo, hi)`` -> ``[lo, mid)``, ``[mid, hi)``, ``mid = lo + ceil((hi - lo) / 2)``; a single block
      stays itself), every child is scored by its representative key, the centre token of its span
      (candidate-token ``(lo + hi) * block // 2``, clipped to the last key), as
      :math:`\max_{i \in b} q_i \cdot k_{rep}`, and the ``topk`` best children are kept (ties: lower position).
      Each step scores ``2 topk`` keys per query block: ``O(N log N)`` in all.

    Returns int64 ``[B, H, ceil(N / block), window + topk]``: the window blocks, then the found blocks in
    ascending order; ``-1`` marks unused slots (at the end of each part). Causal attention must still apply the
    token-level causal mask (inside the own block).
    """
    _check_qk(q, k)
    for name, value, low in (("block", block, 1), ("topk", topk, 0), ("window", window, 1)):
        _check_int(name, value, low)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got causal={causal!r}")
    B, H, N, D = q.shape
    dev = q.device
    n = math.ceil(N / block)
    k = _per_query_head(k, H)  # (B, H, N, D)
    lo_w, hi_w = _hip_window(n, window, causal, dev)  # (nQB,)
    width = hi_w - lo_w + 1  # window blocks per query block
    win = lo_w[:, None] + torch.arange(window, device=dev)  # (nQB, window)
    win = torch.where(torch.arange(window, device=dev) < width[:, None], win, -1)
    C = lo_w if causal else n - width  # candidates per query block (causal: only the blocks before the window)
    slots = torch.full((B, H, n, window + topk), -1, dtype=torch.long, device=dev)
    slots[..., :window] = win
    if topk == 0 or int(C.max()) == 0:
        return slots

    def block_of(pos: Tensor) -> Tensor:  # candidate position -> key block id (skips the window)
        return torch.where(pos < lo_w[:, None], pos, pos + width[:, None])

    j = torch.arange(topk, device=dev)
    Cc = C[:, None]  # (nQB, 1)
    many = Cc > topk
    lo = torch.where(many, j * Cc // topk, j).expand(n, topk)  # (nQB, k)
    hi = torch.where(many, (j + 1) * Cc // topk, torch.where(j < Cc, j + 1, j)).expand(n, topk)
    lo, hi = lo[None, None].expand(B, H, n, topk), hi[None, None].expand(B, H, n, topk)
    if N % block:  # pad the last query block with copies of its last row: the max over rows is unchanged
        q = torch.cat([q, q[:, :, -1:].expand(B, H, n * block - N, D)], 2)
    qblk = q.reshape(B, H, n, block, D)  # (B, H, nQB, bq, D)
    while bool((hi - lo > 1).any()):
        size = hi - lo
        mid = torch.where(size > 1, lo + (size + 1) // 2, hi)
        c_lo = torch.stack([lo, mid], -1).flatten(-2)  # (B, H, nQB, 2k), children in position order
        c_hi = torch.stack([mid, hi], -1).flatten(-2)
        centre = (c_lo + c_hi) * block // 2  # the child's centre token, candidate-token coordinates
        pos = (centre // block).clamp(max=n - 1)
        tok = (block_of(pos.view(B * H, n, -1)).view(pos.shape) * block + centre % block).clamp(max=N - 1)
        reps = k.gather(2, tok.reshape(B, H, -1, 1).expand(B, H, n * 2 * topk, D)).view(B, H, n, 2 * topk, D)
        score = (qblk @ reps.transpose(-1, -2)).amax(-2)  # (B, H, nQB, 2k): max over the block's queries
        score = score.masked_fill(c_hi <= c_lo, float("-inf"))  # (B, H, nQB, 2k), empty children last
        keep = torch.sort(_first_by_score(score, topk), dim=-1).values  # back in position order
        lo, hi = c_lo.gather(-1, keep), c_hi.gather(-1, keep)
    found = torch.where(hi > lo, block_of(lo.reshape(B * H, n, topk)).view(lo.shape), n)
    found = torch.sort(found, dim=-1).values
    slots[..., window:] = found.masked_fill(found == n, -1)
    return slots


# ---- to the engine's form -------------------------------------------------------------------------------
def blocks_from_token_selection(sel: Tensor, block_q: int) -> tuple[Tensor, Tensor]:
    """Per-query selection ``sel`` bool ``[B, H, N, n_kv_blocks]`` -> ``(kv_blocks, row_mask)`` for
    :func:`~headwise.core.selected.block_select_attention`: ``kv_blocks`` ``[B, H, ceil(N / block_q), S]`` lists the
    blocks some row of the query block selected (``-1`` padding; ``S`` the most any query block needs) and
    ``row_mask`` ``[B, H, ceil(N / block_q), S, block_q]`` which rows selected each."""
    if not isinstance(sel, Tensor) or sel.dtype != torch.bool or sel.dim() != 4:
        raise TypeError(f"sel must be a bool tensor [B, H, N, n_kv_blocks], got {getattr(sel, 'dtype', type(sel))} "
                        f"{tuple(getattr(sel, 'shape', ()))}")
    _check_int("block_q", block_q)
    B, H, N, n_kb = sel.shape
    n_qb = math.ceil(N / block_q)
    if N % block_q:  # rows past the end select nothing
        sel = torch.cat([sel, sel.new_zeros(B, H, n_qb * block_q - N, n_kb)], 2)
    rows = sel.view(B, H, n_qb, block_q, n_kb).transpose(-1, -2)  # (B, H, nQB, nKB, bq)
    used = rows.any(-1)  # (B, H, nQB, nKB)
    S = max(1, int(used.sum(-1).max()))
    order = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices[..., :S]  # used blocks first
    kv_blocks = torch.where(used.gather(-1, order), order, -1)
    row_mask = rows.gather(-2, order[..., None].expand(B, H, n_qb, S, block_q))
    return kv_blocks, row_mask
