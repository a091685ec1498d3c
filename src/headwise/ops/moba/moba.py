"""MoBA (Lu et al., 2025) and VMoBA (Wu et al., 2025) attention on the block-sparse engine.

The selection functions of :mod:`headwise.ops.selection.blocks` choose the blocks under ``torch.no_grad`` (the
selection is not differentiated, as in the papers, which train through the attention over the chosen blocks) and
:func:`headwise.core.selected.token_block_attention` attends over exactly those blocks, so the work follows the
selection. The references are in :mod:`headwise.ops.moba.naive`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.selected import token_block_attention
from headwise.ops.selection.blocks import moba_select, vmoba_partition, vmoba_select
from headwise.patterns import Causal

__all__ = ["moba_attention", "vmoba_attention"]


def moba_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 512, topk: int = 3, causal: bool = True,
                   scale: float | None = None, backend: str = "auto", return_selection: bool = False):
    """MoBA attention over ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, N, D]`` -> ``[B, H, N, Dv]``.

    Each query attends to the tokens of its ``topk`` selected key blocks (:func:`~headwise.ops.selection.moba_select`:
    own block + the ``topk - 1`` best earlier blocks by ``q . mean(block keys)``), with the token-level causal mask
    when ``causal``. ``return_selection`` also returns the selection, bool ``[B, H, N, ceil(N / block)]`` as
    passed to the engine (:func:`~headwise.core.selected.token_block_attention`).
    """
    with torch.no_grad():
        sel = moba_select(q.detach(), k.detach(), block=block, topk=topk, causal=causal)  # (B, H, N, nKB)
    out = token_block_attention(q, k, v, sel, block_kv=block, pattern=Causal() if causal else None, scale=scale,
                                backend=backend)  # (B, H, N, Dv)
    return (out, sel) if return_selection else out


def vmoba_attention(q: Tensor, k: Tensor, v: Tensor, *, grid: tuple[int, int, int], partition: str = "1d",
                    block=1, selection: str = "threshold", scope: str = "head", tau: float = 0.25, topk: int = 3,
                    scale: float | None = None, backend: str = "auto", return_selection: bool = False):
    """VMoBA attention (non-causal) over the ``N = T H W`` tokens of a video ``grid`` (row-major ``(T, H, W)``).

    The tokens are put in the block order of ``partition`` (``"1d"``, ``"2d"``, ``"3d"`` with ``block`` as in
    :func:`~headwise.ops.selection.vmoba_partition`), blocks are selected by
    :func:`~headwise.ops.selection.vmoba_select` (``selection``, ``scope``, ``tau``, ``topk``), attention runs over
    the selected blocks and the output is put back in the grid order. ``q`` ``[B, H, N, D]``, ``k``, ``v``
    ``[B, H_kv, N, D]`` -> ``[B, H, N, Dv]``. ``return_selection`` also returns the selection bool
    ``[B, H, N, blocks]`` (in the partition's token order).
    """
    perm, size = vmoba_partition(grid, partition, block)
    N = q.shape[2]
    if perm.numel() != N:
        raise ValueError(f"q has N={N} tokens but grid={tuple(grid)} has {perm.numel()}")
    moved = not torch.equal(perm, torch.arange(N))
    if moved:
        perm = perm.to(q.device)
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))  # block order
    with torch.no_grad():
        sel = vmoba_select(q.detach(), k.detach(), block=size, selection=selection, scope=scope, tau=tau, topk=topk)
    out = token_block_attention(q, k, v, sel, block_kv=size, scale=scale, backend=backend)  # (B, H, N, Dv) block order
    if moved:
        out = out.index_select(2, torch.argsort(perm))  # back to the grid order
    return (out, sel) if return_selection else out
