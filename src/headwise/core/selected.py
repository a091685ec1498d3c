"""Attention over keys chosen at run time (MoBA, VMoBA, HiP, DMA, ...): the selection becomes speed.

A content-aware method picks, per (batch, head), which keys each query visits; this module runs attention over
exactly those keys on the block-sparse engine, so the work is proportional to what was selected. The selection is
an input computed by the caller (``headwise.ops.selection``); gradients flow to ``q``, ``k``, ``v``, not to it.
Rows with no key give zeros and ``lse = -inf``. Three entry points, three selection shapes:

* :func:`block_select_attention`: ``kv_blocks[b, h, query block, slot]`` key block ids, optionally narrowed
  per row by ``row_mask`` (dense meaning: :func:`selection_mask`).
* :func:`token_block_attention`: ``sel[b, h, query, key block]`` per query (:func:`token_selection_mask`).
* :func:`candidate_attention`: a query block's own keys under an element mask, plus a leading run of its
  block's candidate list per query (:func:`candidate_mask`).

Layouts on the CPU kernel (``kernels/blocksparse.cpp``, grouped entry points):

* block-major (``block_select_attention`` without ``row_mask``): each query block's rows visit the union of its
  selected blocks; one schedule per (batch, head).
* row-major (per-query selections): every selected (query, key block) pair becomes a *virtual row*; the kernel's
  ``row_major_schedule`` groups virtual rows by key block into query tiles, so each tile is one GEMM against one
  contiguous key block and no unselected pair is computed; the kernel reads each row's query through ``q_index``.
  Partial results merge by the log-sum-exp (the kernel's ``merge_rows``); the backward reuses the kernel with the
  merged lse and ``delta = rowsum(dO * O)``, which gives each virtual row its exact share of the gradient.
* candidates: the candidate keys of every block are gathered once behind the tokens; a query tile visits its
  own key tiles (element masks) and its block's candidate tiles, cut per row by ``[block start, candidates
  start + n_extra)``.

Key tiles wholly outside the union of a tile's row bounds are skipped and the others clipped to it. ``pattern``
must be ``None`` or :class:`~headwise.patterns.Causal` on the kernel (applied as per-row key bounds); any other
pattern, and every non-CPU device, uses a masked PyTorch path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from headwise.core.blocksparse import extension, take_rows
from headwise.core.checks import check_qkv, default_scale
from headwise.core.reference import masked_attention
from headwise.patterns.base import Causal, Pattern

__all__ = ["BACKENDS", "MAX_OWN_BLOCK", "block_select_attention", "selection_mask", "token_block_attention", "token_selection_mask",
           "candidate_attention", "candidate_mask"]

_ROWS = 64  # query rows per engine tile (block-major layout)
_VROWS = 128  # virtual rows per engine tile (row-major layout; measured ~10 % faster than 64 on MoBA's 512-key blocks)
_KV_PIECE = 512  # key blocks larger than this are split into engine tiles of at most this many keys
BACKENDS = ("auto", "reference", "blocksparse")
MAX_OWN_BLOCK = 1024  # candidate_attention's own block is one kernel key tile: at most the kernel's chunk (kChunk)
_EMPTY = torch.empty(0, dtype=torch.long)  # "none" for the kernel's optional tensor arguments


# ---- checks and the dense meaning ----------------------------------------------------------------------
def _check_selection(kv_blocks, n_q, n_kv, block_q, block_kv, row_mask, pattern, B=None, H=None):
    for name, val in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={val!r}")
    if not isinstance(kv_blocks, Tensor) or kv_blocks.dim() != 4 or kv_blocks.dtype != torch.long:
        raise TypeError(f"kv_blocks must be an int64 tensor [B, H, ceil(N / block_q), S], got "
                        f"{type(kv_blocks).__name__} {getattr(kv_blocks, 'shape', '')} {getattr(kv_blocks, 'dtype', '')}")
    n_qb, n_kb = math.ceil(n_q / block_q), math.ceil(n_kv / block_kv)
    if kv_blocks.shape[2] != n_qb:
        raise ValueError(f"kv_blocks.shape={tuple(kv_blocks.shape)} needs ceil({n_q=} / {block_q=}) = {n_qb} query blocks")
    if B is not None and tuple(kv_blocks.shape[:2]) != (B, H):
        raise ValueError(f"kv_blocks.shape={tuple(kv_blocks.shape)} must start with (B, H) = {(B, H)}")
    if kv_blocks.numel() and (int(kv_blocks.min()) < -1 or int(kv_blocks.max()) >= n_kb):
        raise ValueError(f"kv_blocks values must be -1 or in [0, {n_kb}) (ceil({n_kv=} / {block_kv=})), "
                         f"got min {int(kv_blocks.min())}, max {int(kv_blocks.max())}")
    if row_mask is not None:
        want = (*kv_blocks.shape, block_q)
        if not isinstance(row_mask, Tensor) or row_mask.dtype != torch.bool or tuple(row_mask.shape) != want:
            raise ValueError(f"row_mask must be a bool tensor of shape {want}, got "
                             f"{getattr(row_mask, 'dtype', type(row_mask).__name__)} {tuple(getattr(row_mask, 'shape', ()))}")
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a headwise Pattern or None, got {pattern!r}")
        pattern.check(n_q, n_kv)


def selection_mask(kv_blocks: Tensor, n_q: int, n_kv: int, *, block_q: int, block_kv: int,
                   row_mask: Tensor | None = None, pattern: Pattern | None = None) -> Tensor:
    """The dense boolean mask ``[B, H, n_q, n_kv]`` a selection means (the reference; O(N M) memory)."""
    _check_selection(kv_blocks, n_q, n_kv, block_q, block_kv, row_mask, pattern)
    B, H, n_qb, S = kv_blocks.shape
    n_kb = math.ceil(n_kv / block_kv)
    use = (kv_blocks >= 0)[..., None].expand(B, H, n_qb, S, block_q)  # (B, H, nQB, S, bq)
    if row_mask is not None:
        use = use & row_mask.to(kv_blocks.device)
    sel = torch.zeros(B, H, n_qb, block_q, n_kb + 1, dtype=torch.int32, device=kv_blocks.device)
    idx = kv_blocks.masked_fill(kv_blocks < 0, n_kb)[:, :, :, None, :].expand(B, H, n_qb, block_q, S)
    sel.scatter_add_(-1, idx, use.transpose(-1, -2).to(torch.int32))
    blocks = (sel[..., :n_kb] > 0).reshape(B, H, n_qb * block_q, n_kb)[:, :, :n_q]  # (B, H, N, nKB)
    mask = blocks.repeat_interleave(block_kv, dim=-1)[..., :n_kv]  # (B, H, N, M)
    if pattern is not None:
        mask = mask & pattern.dense_mask(n_q, n_kv, device=mask.device)  # (H or 1, N, M)
    return mask


# ---- entry point ---------------------------------------------------------------------------------------
def block_select_attention(q: Tensor, k: Tensor, v: Tensor, kv_blocks: Tensor, *, block_q: int, block_kv: int,
                           row_mask: Tensor | None = None, pattern: Pattern | None = None,
                           scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Attention restricted to run-time selected key blocks.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]`` (GQA as in :func:`headwise.attention`).
        kv_blocks: int64 ``[B, H, ceil(N / block_q), S]``: key block ids (``0 .. ceil(M / block_kv) - 1``) each
            query block visits; ``-1`` = unused slot; order free; a repeated id counts once.
        block_q, block_kv: query / key block sizes in tokens (the last blocks may be shorter).
        row_mask: optional bool ``[B, H, ceil(N / block_q), S, block_q]``: row ``r`` of the query block uses slot ``s``.
        pattern: optional static pattern intersected at token level (e.g. ``Causal()``).
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp per row ``[B, H, N]``.
        backend: ``"auto"`` (the CPU kernel when it applies, else the chunked PyTorch path), ``"reference"``
            (dense :func:`selection_mask` + materialized softmax) or ``"blocksparse"``.

    Returns:
        ``out`` ``[B, H, N, Dv]`` (or ``(out, lse)``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; valid: {', '.join(map(repr, BACKENDS))}")
    check_qkv(q, k, v, None, scale)
    B, H, N, _ = q.shape
    M = k.shape[2]
    _check_selection(kv_blocks, N, M, block_q, block_kv, row_mask, pattern, B, H)
    kv_blocks = kv_blocks.to(q.device)
    row_mask = None if row_mask is None else row_mask.to(q.device)
    scale = default_scale(q, scale)
    if backend == "reference":
        mask = selection_mask(kv_blocks, N, M, block_q=block_q, block_kv=block_kv, row_mask=row_mask, pattern=pattern)
        out, lse = masked_attention(q, k, v, mask, scale)
    elif _kernel_applies(q, pattern):
        kv_bounds, pieces = _kv_tiles(M, block_kv)
        if row_mask is None:
            sched = _block_major(_dedupe(kv_blocks), N, M, block_q, block_kv, pieces, kv_bounds, pattern)
        else:
            sched = _row_major(kv_blocks, row_mask, N, M, block_q, pieces, pattern)
        out, lse = _kernel_path(q, k, v, sched, kv_bounds, scale)
    else:
        def rows_mask(r0, r1):  # (B, H, r1 - r0, M); r0, r1 on query block bounds
            b0, b1 = r0 // block_q, math.ceil(r1 / block_q)
            rm = None if row_mask is None else row_mask[:, :, b0:b1]
            return selection_mask(kv_blocks[:, :, b0:b1], r1 - r0, M, block_q=block_q, block_kv=block_kv, row_mask=rm)

        out, lse = _chunked_path(q, k, v, rows_mask, block_q, pattern, scale)
    return (out, lse) if return_lse else out


def _check_token_selection(sel, n_q, n_kv, block_kv, pattern, B=None, H=None):
    """``n_q=None``: any number of queries (the mask builder)."""
    if isinstance(block_kv, bool) or not isinstance(block_kv, int) or block_kv < 1:
        raise ValueError(f"block_kv must be a positive int, got block_kv={block_kv!r}")
    n_kb = math.ceil(n_kv / block_kv)
    if not isinstance(sel, Tensor) or sel.dtype != torch.bool or sel.dim() != 4:
        raise TypeError(f"sel must be a bool tensor [B, H, N, ceil(M / block_kv)], got {type(sel).__name__} "
                        f"{getattr(sel, 'dtype', '')} {tuple(getattr(sel, 'shape', ()))}")
    n_q = sel.shape[2] if n_q is None else n_q
    want = (B if B is not None else sel.shape[0], H if H is not None else sel.shape[1], n_q, n_kb)
    if tuple(sel.shape) != want:
        raise ValueError(f"sel.shape={tuple(sel.shape)} must be (B, H, N, ceil({n_kv=} / {block_kv=})) = {want}")
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a headwise Pattern or None, got {pattern!r}")
        pattern.check(n_q, n_kv)


def token_selection_mask(sel: Tensor, n_kv: int, *, block_kv: int, pattern: Pattern | None = None) -> Tensor:
    """The dense boolean mask ``[B, H, N, n_kv]`` of a per-query block selection (the reference; O(N M) memory)."""
    _check_token_selection(sel, None, n_kv, block_kv, pattern)
    mask = sel.repeat_interleave(block_kv, dim=-1)[..., :n_kv]  # (B, H, N, M)
    if pattern is not None:
        mask = mask & pattern.dense_mask(sel.shape[2], n_kv, device=mask.device)  # (H or 1, N, M)
    return mask


def token_block_attention(q: Tensor, k: Tensor, v: Tensor, sel: Tensor, *, block_kv: int,
                          pattern: Pattern | None = None, scale: float | None = None, return_lse: bool = False,
                          backend: str = "auto"):
    """Attention over key blocks chosen per query (MoBA, VMoBA): query ``i`` attends key ``j`` iff
    ``sel[b, h, i, j // block_kv]`` and ``pattern.mask(i, j)`` (when given); rows with no key give zeros.

    The kernel runs the row-major layout (module docstring): every selected (query, block) pair is a virtual
    row, the rows of one key block form the tiles of one GEMM against that block, and a query's rows merge by
    the log-sum-exp. Same arguments as :func:`block_select_attention`, with ``sel`` bool
    ``[B, H, N, ceil(M / block_kv)]`` in place of ``kv_blocks`` / ``row_mask``; ``"reference"`` materializes
    :func:`token_selection_mask`. A ``sel`` that is a transposed view of a contiguous ``[B, H, blocks, N]``
    tensor (as :func:`headwise.ops.selection.moba_select` returns) is used without a copy.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; valid: {', '.join(map(repr, BACKENDS))}")
    check_qkv(q, k, v, None, scale)
    B, H, N, _ = q.shape
    M = k.shape[2]
    _check_token_selection(sel, N, M, block_kv, pattern, B, H)
    sel = sel.to(q.device)
    scale = default_scale(q, scale)
    if backend == "reference":
        out, lse = masked_attention(q, k, v, token_selection_mask(sel, M, block_kv=block_kv, pattern=pattern), scale)
    elif _kernel_applies(q, pattern):
        kv_bounds, pieces = _kv_tiles(M, block_kv)
        table = sel.transpose(-1, -2).reshape(B * H, sel.shape[-1], N)  # (BH, nKB, N)
        out, lse = _kernel_path(q, k, v, _row_major_table(table, B, H, M, pieces, pattern), kv_bounds, scale)
    else:
        def rows_mask(r0, r1):  # (B, H, r1 - r0, M)
            return sel[:, :, r0:r1].repeat_interleave(block_kv, dim=-1)[..., :M]

        out, lse = _chunked_path(q, k, v, rows_mask, 1, pattern, scale)
    return (out, lse) if return_lse else out


def _kernel_applies(q: Tensor, pattern: Pattern | None) -> bool:
    return (q.device.type == "cpu" and (pattern is None or type(pattern) is Causal)
            and extension() is not None)


def _chunked_path(q, k, v, rows_mask, step, pattern, scale, max_elems=1 << 24):
    """Masked dense attention over query chunks (multiples of ``step`` rows; ``rows_mask(r0, r1)`` gives the
    selection's ``[B, H, r1 - r0, M]`` mask): O(chunk x M) memory; any device."""
    B, H, N, _ = q.shape
    M = k.shape[2]
    rows = step * max(1, max_elems // max(1, B * H * step * M))
    outs, lses = [], []
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        mask = rows_mask(r0, r1)  # (B, H, r1 - r0, M)
        if pattern is not None:
            mask = mask & pattern.rows_mask(torch.arange(r0, r1, device=q.device), M)  # (B, H, c, M)
        o, l = masked_attention(q[:, :, r0:r1], k, v, mask, scale)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


# ---- own block + gathered far keys (DMA) ----------------------------------------------------------------
def _check_candidates(q, k, extra, n_extra, own_mask, block):
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got block={block!r}")
    B, H, N, _ = q.shape
    if k.shape[2] != N:
        raise ValueError(f"candidate_attention is self-attention: q has N={N} tokens, k has {k.shape[2]}")
    nb = math.ceil(N / block)
    if not isinstance(extra, Tensor) or extra.dtype != torch.long or extra.dim() != 4 or tuple(extra.shape[:3]) != (B, H, nb):
        raise ValueError(f"extra must be an int64 tensor [B, H, ceil(N / block), W] = [{B}, {H}, {nb}, W], got "
                         f"{getattr(extra, 'dtype', type(extra).__name__)} {tuple(getattr(extra, 'shape', ()))}")
    W = extra.shape[-1]
    if not isinstance(n_extra, Tensor) or n_extra.dtype.is_floating_point or tuple(n_extra.shape) != (B, H, N):
        raise ValueError(f"n_extra must be an integer tensor [B, H, N] = {[B, H, N]}, got "
                         f"{getattr(n_extra, 'dtype', type(n_extra).__name__)} {tuple(getattr(n_extra, 'shape', ()))}")
    if not isinstance(own_mask, Tensor) or own_mask.dtype != torch.bool or tuple(own_mask.shape) != (B, H, nb, block, block):
        raise ValueError(f"own_mask must be a bool tensor [B, H, ceil(N / block), block, block] = "
                         f"{[B, H, nb, block, block]}, got {getattr(own_mask, 'dtype', type(own_mask).__name__)} "
                         f"{tuple(getattr(own_mask, 'shape', ()))}")
    if n_extra.numel() and (int(n_extra.min()) < 0 or int(n_extra.max()) > W):
        raise ValueError(f"n_extra values must be in [0, W={W}], got min {int(n_extra.min())}, max {int(n_extra.max())}")
    if extra.numel() and int(extra.max()) >= N:
        raise ValueError(f"extra must hold key ids in [0, {N}) or -1, got max {int(extra.max())}")
    filled = (extra >= 0).to(torch.int32).cumprod(-1).sum(-1)  # (B, H, nb) leading valid slots of each block
    if bool((n_extra > filled.repeat_interleave(block, dim=2)[:, :, :N]).any()):
        raise ValueError("the first n_extra slots of extra must hold key ids (not -1) for every query")


def candidate_mask(extra: Tensor, n_extra: Tensor, own_mask: Tensor, n: int, *, block: int) -> Tensor:
    """The dense mask ``[B, H, n, n]`` of :func:`candidate_attention` (the reference; O(N^2) memory)."""
    B, H, nb, W = extra.shape
    mask = torch.zeros(B, H, nb * block, n + 1, dtype=torch.bool, device=extra.device)  # column n: padding slots
    used = torch.arange(W, device=extra.device) < _pad_rows(n_extra, nb * block)[..., None]  # (B, H, nb*bq, W)
    slots = extra.repeat_interleave(block, dim=2).masked_fill(~used, n).clamp(max=n)  # (B, H, nb*bq, W)
    mask.scatter_(-1, slots.masked_fill(slots < 0, n), True)
    mask = mask[..., :n].view(B, H, nb, block, n)
    starts = torch.arange(nb, device=extra.device) * block
    cols = starts[:, None] + torch.arange(block, device=extra.device)  # (nb, bq) own key positions
    own = torch.zeros(B, H, nb, block, n + block, dtype=torch.bool, device=extra.device)
    own.scatter_(-1, cols[None, None, :, None, :].expand(B, H, nb, block, block), own_mask)
    mask = mask | own[..., :n]
    return mask.view(B, H, nb * block, n)[:, :, :n]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``[B, H, N]`` -> ``[B, H, rows]`` with zeros past ``N``."""
    return torch.nn.functional.pad(x, (0, rows - x.shape[-1]))


def candidate_attention(q: Tensor, k: Tensor, v: Tensor, extra: Tensor, n_extra: Tensor, own_mask: Tensor, *,
                        block: int, scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Self-attention where query block ``c`` (queries ``a = c * block .. a + block - 1``) sees (1) its own keys
    ``a + j`` where ``own_mask[b, h, c, i, j]`` and (2) the first ``n_extra[b, h, a + i]`` keys of its candidate
    list ``extra[b, h, c]`` (key ids before ``a`` or anywhere; they must not repeat the own keys).

    This is causal Dynamic Mask Attention's structure (``extra``: the best keys before the block in the kept
    order, ``own_mask``: which own keys each query keeps), and any "local block + selected far keys" method.
    On the CPU kernel the candidates of every block are gathered once into a key buffer behind ``k``; each query
    tile is one GEMM over its own block (element mask) and its candidates (per-row bound ``n_extra``), so no
    unselected far key is computed. Elsewhere (``"reference"``, other devices, or ``block`` over
    :data:`MAX_OWN_BLOCK`, one kernel key tile) the dense :func:`candidate_mask`: O(N^2) memory.

    Shapes: q ``[B, H, N, D]``, k ``[B, H, N, D]``, v ``[B, H, N, Dv]`` (one key head per query head), extra int64
    ``[B, H, ceil(N / block), W]`` (-1 = unused slot), n_extra int ``[B, H, N]`` in ``[0, W]``, own_mask bool
    ``[B, H, ceil(N / block), block, block]``. Returns ``out`` ``[B, H, N, Dv]`` (or ``(out, lse)``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; valid: {', '.join(map(repr, BACKENDS))}")
    check_qkv(q, k, v, None, scale)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"candidate_attention needs one key head per query head, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")
    _check_candidates(q, k, extra, n_extra, own_mask, block)
    scale = default_scale(q, scale)
    B, H, N, D = q.shape
    if backend == "reference" or not _kernel_applies(q, None) or block > MAX_OWN_BLOCK:
        mask = candidate_mask(extra, n_extra, own_mask, N, block=block)
        out, lse = masked_attention(q, k, v, mask, scale)
        return (out, lse) if return_lse else out
    nb, W = extra.shape[2], extra.shape[3]
    Np = nb * block
    if Np > N:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, Np - N)) for t in (q, k, v))  # (B, H, Np, .)
    own = torch.arange(Np, device=q.device).expand(B * H, Np)
    idx = torch.cat([own, extra.clamp_min(0).reshape(B * H, nb * W)], 1)  # unused slots read key 0, never seen
    keys, values = take_rows(k, idx), take_rows(v, idx)  # (B, H, Np + nb W, D / Dv): own tokens, candidates
    sched, kv_bounds = _candidate_schedule(_pad_rows(n_extra.long(), Np), own_mask, block, W, Np)
    out, lse = _kernel_path(q, keys, values, sched, kv_bounds, scale)
    out, lse = out[:, :, :N], lse[:, :, :N]
    return (out, lse) if return_lse else out


def _candidate_schedule(n_extra, own_mask, block, W, Np):
    """Kernel schedule of :func:`candidate_attention` over keys ``[own tokens (Np) | block 0's candidates (W) |
    block 1's | ...]``. Each block is cut into ``sub`` row tiles of <= _ROWS rows and its own keys into the same
    ``sub`` key tiles; row tile ``s`` visits the own key tiles where ``own_mask`` has an entry (``0 .. s`` for a
    causal mask: about half of the block), each with its element mask, then the candidate tiles; row ``i`` sees
    ``[a, Np + c W + n_extra[i])``, which cuts the candidate list and leaves the own tiles to their masks."""
    B, H, nb, bq, _ = own_mask.shape
    G = B * H
    sub = math.ceil(bq / _ROWS)
    rp = math.ceil(bq / sub)  # rows (and own keys) per tile; the last tile of a block may be shorter
    nQT = nb * sub
    starts = (torch.arange(nb)[:, None] * bq + torch.arange(sub)[None, :] * rp).reshape(-1).clamp(max=Np)
    q_bounds = torch.cat([starts, torch.tensor([Np])])[None]  # (1, nQT + 1)
    pieces = max(1, math.ceil(W / _KV_PIECE)) if W else 0
    width = math.ceil(W / pieces) if W else 0
    cand = (Np + torch.arange(nb)[:, None] * W + torch.arange(pieces)[None, :] * width).reshape(-1)
    kv_bounds = torch.cat([starts, cand, torch.tensor([Np + nb * W])])  # own tile c * sub + s', then candidates
    pad = sub * rp - bq
    masks = own_mask.reshape(G, nb, bq, bq)
    if pad:
        masks = torch.nn.functional.pad(masks, (0, pad, 0, pad))
    words = masks.contiguous().view(torch.int64) if rp % 8 == 0 else masks  # any() over 8 bools at once
    visit = words.view(G, nb, sub, rp, sub, -1).ne(0).any(-1).any(3)  # (G, nb, s, s'): tile s keeps a key of s'
    masks = masks.view(G, nb, sub, rp, sub, rp)  # (G, nb, s, row, s', key)
    part_mask = masks.transpose(3, 4).reshape(G * nQT * sub, rp, rp)  # (g, c, s, s') -> one element mask
    own_ids = (torch.arange(nb)[:, None, None] * sub + torch.arange(sub)).expand(G, nb, sub, sub)  # (G, nb, s, s')
    own_tiles = torch.where(visit, own_ids, -1).reshape(G, nQT, sub)
    own_part = torch.where(visit, torch.arange(G * nQT * sub).view(G, nb, sub, sub), -1).reshape(G, nQT, sub)
    cand_tiles = (nQT + torch.arange(nb)[:, None] * pieces + torch.arange(pieces)).repeat_interleave(sub, 0)
    cand_tiles = cand_tiles.expand(G, nQT, pieces)
    tiles = torch.cat([own_tiles, cand_tiles], -1)  # (G, nQT, sub + pieces)
    part_idx = torch.cat([own_part, torch.full_like(cand_tiles, -1)], -1)
    order = (tiles < 0).to(torch.int8).argsort(dim=-1, stable=True)  # unvisited own tiles last, the rest in order
    tiles, part_idx = tiles.gather(-1, order), part_idx.gather(-1, order)
    block_of = torch.arange(Np) // bq  # (Np,)
    lo = (block_of * bq).expand(G, Np)
    hi = Np + block_of * W + n_extra.reshape(G, Np)
    sched = _Schedule(q_bounds, tiles, torch.stack([lo, hi], -1), None, None, part_idx, part_mask)
    return sched, kv_bounds


# ---- the CPU kernel path -------------------------------------------------------------------------------
def _kv_tiles(M: int, block_kv: int) -> tuple[Tensor, int]:
    """Engine key-tile bounds: each selection block split into ``pieces`` tiles of at most _KV_PIECE keys."""
    pieces = math.ceil(block_kv / _KV_PIECE)
    width = math.ceil(block_kv / pieces)
    n_kb = math.ceil(M / block_kv)
    starts = (torch.arange(n_kb)[:, None] * block_kv + torch.arange(pieces)[None, :] * width).reshape(-1)
    return torch.cat([starts.clamp(max=M), torch.tensor([M])]), pieces  # pieces * width >= block_kv: contiguous


def _row_bounds(rows: Tensor, M: int, pattern: Pattern | None) -> Tensor:
    """Per-row visible key range ``[lo, hi)`` ``(..., 2)`` for ``pattern`` (None or Causal)."""
    hi = torch.full_like(rows, M) if pattern is None else (rows + pattern.offset + 1).clamp(0, M)
    return torch.stack([torch.zeros_like(rows), hi], -1)


def _dedupe(kv_blocks: Tensor) -> Tensor:
    """Sort each slot list ascending with repeats and unused slots (-1) last."""
    big = torch.iinfo(torch.long).max
    key = kv_blocks.masked_fill(kv_blocks < 0, big).sort(-1).values
    repeat = torch.zeros_like(key, dtype=torch.bool)
    repeat[..., 1:] = key[..., 1:] == key[..., :-1]
    key = key.masked_fill(repeat, big).sort(-1).values
    return key.masked_fill(key == big, -1)


def _kernel_path(q, k, v, sched, kv_bounds, scale):
    dtype = q.dtype
    work = (lambda t: t) if dtype in (torch.float32, torch.float64) else (lambda t: t.float())
    out, lse = _GroupedKernel.apply(work(q), work(k), work(v), sched, kv_bounds, scale)
    return out.to(dtype), lse


def _block_major(kv_blocks, N, M, block_q, block_kv, pieces, kv_bounds, pattern):
    """Every query block's rows visit its selected blocks; engine tiles of <= _ROWS rows inside the block."""
    B, H, n_qb, S = kv_blocks.shape
    sub = math.ceil(block_q / _ROWS)
    rows_per = math.ceil(block_q / sub)
    starts = (torch.arange(n_qb)[:, None] * block_q + torch.arange(sub)[None, :] * rows_per).reshape(-1)
    q_bounds = torch.cat([starts.clamp(max=N), torch.tensor([N])])  # sub-tiles are contiguous
    tiles = kv_blocks[:, :, :, None, :, None] * pieces + torch.arange(pieces)  # (B, H, nQB, 1, S, pieces)
    tiles = tiles.masked_fill((kv_blocks < 0)[:, :, :, None, :, None], -1)
    tiles = tiles.expand(B, H, n_qb, sub, S, pieces).reshape(B * H, n_qb * sub, S * pieces)
    row_bounds = None
    if pattern is not None:  # causal: drop key tiles wholly after a query tile's last visible key
        hi_last = (q_bounds[1:] - 1 + pattern.offset + 1).clamp(0, M)  # (nQT,)
        start = kv_bounds[tiles.clamp(min=0)]
        tiles = tiles.masked_fill(start >= hi_last[None, :, None], -1)
        row_bounds = _row_bounds(torch.arange(N), M, pattern)[None]  # (1, N, 2)
    tiles = _ascending(tiles)
    return _Schedule(q_bounds[None].contiguous(), tiles.contiguous(), row_bounds, None, None)


def _ascending(tiles: Tensor) -> Tensor:
    """Each slot list sorted ascending with the -1 (unused) slots last."""
    big = torch.iinfo(torch.long).max
    key = tiles.masked_fill(tiles < 0, big).sort(-1).values
    return key.masked_fill(key == big, -1)


def _row_major(kv_blocks, row_mask, N, M, block_q, pieces, pattern):
    """Virtual rows = selected (query, key block) pairs: the selection scattered into a dense ``[B * H, key
    blocks, N]`` table (a repeated slot ORs in), scheduled by :func:`_row_major_table`."""
    B, H, n_qb, S = kv_blocks.shape
    BH = B * H
    n_kb = max(1, int(kv_blocks.max()) + 1)
    index = kv_blocks.masked_fill(kv_blocks < 0, n_kb).reshape(BH, n_qb, S).transpose(1, 2)  # (BH, S, nQB)
    index = index[..., None].expand(BH, S, n_qb, block_q)
    src = row_mask.reshape(BH, n_qb, S, block_q).transpose(1, 2).to(torch.int32)  # (BH, S, nQB, bq)
    table = torch.zeros(BH, n_kb + 1, n_qb, block_q, dtype=torch.int32).scatter_add_(1, index, src)
    table = table[:, :n_kb].reshape(BH, n_kb, n_qb * block_q)[..., :N] > 0  # (BH, nKB, N)
    return _row_major_table(table, B, H, M, pieces, pattern)


def _row_major_table(table: Tensor, B: int, H: int, M: int, pieces: int, pattern) -> "_Schedule":
    """The kernel's row-major schedule of ``table`` bool ``[B * H, key blocks, N]`` (query ``n`` visits block
    ``b``): virtual rows grouped by key block into tiles of <= _VROWS rows, so each tile is one GEMM against one
    contiguous key block and no unselected pair is computed (built by the extension's ``row_major_schedule``)."""
    N = table.shape[-1]
    offset = 0 if pattern is None else pattern.offset
    q_bounds, tiles, row_bounds, vq, slots = extension().row_major_schedule(
        table.contiguous(), _VROWS, pieces, M, pattern is not None, offset)
    return _Schedule(q_bounds, tiles, row_bounds, vq, slots.view(B, H, N, -1))


class _Schedule:
    """Grouped kernel inputs: q_bounds [G, nQT + 1], kv_tiles [G, nQT, V], row_bounds [G, Nv, 2] or None, and
    (row-major layout) ``vq`` [B * H, Nv], the query of every virtual row, and ``slots`` [B, H, N, s_max], the
    virtual rows of every query (the padding row ``Nv - 1`` where it selected fewer); ``q_index`` is ``vq`` for
    the kernel (empty for the block-major layout)."""

    def __init__(self, q_bounds, kv_tiles, row_bounds, vq, slots, part_idx=None, part_mask=None):
        self.q_bounds, self.kv_tiles, self.vq, self.slots = q_bounds, kv_tiles, vq, slots
        self.q_index = _EMPTY if vq is None else vq.contiguous()
        self.rb = torch.empty(0, dtype=torch.long) if row_bounds is None else row_bounds.contiguous()
        # element masks of partial tiles (candidate_attention's own blocks); elsewhere row bounds do that part
        self.part_idx = torch.full_like(kv_tiles, -1) if part_idx is None else part_idx.contiguous()
        self.part_mask = torch.zeros(0, 1, 1, dtype=torch.bool) if part_mask is None else part_mask.contiguous()


class _GroupedKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sched: _Schedule, kv_bounds, scale):
        B, H, N, D = q.shape
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        ext = extension()
        out, lse = ext.forward_grouped(q, k, v, sched.q_bounds, kv_bounds, sched.kv_tiles, sched.part_idx,
                                       sched.part_mask, sched.rb, scale, sched.q_index)  # rows or virtual rows
        if sched.vq is not None:  # virtual rows (B, H, Nv, Dv) -> queries (B, H, N, Dv) by the lse merge
            out, lse = ext.merge_rows(out, lse, sched.slots)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sched, ctx.kv_bounds, ctx.scale = sched, kv_bounds, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        s = ctx.sched
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = (dout * out).sum(-1)  # (B, H, N)
        if dlse is not None:
            delta = delta - dlse
        lse_safe = lse.masked_fill(torch.isinf(lse), -1e30).contiguous()
        ext = extension()
        dq, dk, dv = ext.backward_grouped(q, k, v, dout, lse_safe, delta.contiguous(), s.q_bounds, ctx.kv_bounds,
                                          s.kv_tiles, s.part_idx, s.part_mask, s.rb, ctx.scale, s.q_index)
        if s.vq is not None:  # per virtual row (B, H, Nv, D) -> per query: the sum over its rows
            dq = ext.merge_rows(dq, _EMPTY, s.slots)[0]
        return dq, dk, dv, None, None, None


