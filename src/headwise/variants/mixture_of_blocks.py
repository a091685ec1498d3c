"""Mixture-of-block attention: each query visits only the key blocks chosen from the content at run time.

Registered here:

* ``"moba"`` -- :class:`MoBAAttention`, MoBA (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context
  LLMs"): per-query top-k key blocks by ``q . mean(block keys)``, own block always in, causal.
* ``"vmoba"`` -- :class:`VMoBAAttention`, VMoBA (Wu et al., 2025, "VMoBA: Mixture-of-Block Attention for Video
  Diffusion Models"): 1-D / 2-D / 3-D block partitions of a video grid cycling over layers, global (per-head) and
  threshold block selection, non-causal.
* ``"hip"`` -- :class:`HiPAttention`, HiP (Lee et al., 2024, "HiP Attention: Sparse Sub-Quadratic Attention with
  Hierarchical Attention Pruning"): training-free tree search for the top-k key blocks of each query block, plus a
  sliding window.

One functional core per method (:func:`moba_attention`, :func:`vmoba_attention`, :func:`hip_attention`, on
``[B, H, N, D]`` heads): the selection functions of :mod:`headwise.selection.blocks` choose the blocks (under
``torch.no_grad``: the selection is not differentiated, as in the papers, which train through the attention over
the chosen blocks), and :func:`headwise.core.dynamic.token_block_attention` (MoBA, VMoBA: per-query selections)
or :func:`~headwise.core.dynamic.block_select_attention` (HiP: per-query-block selections) attends over exactly
those blocks on the block-sparse engine, so the work follows the selection. The modules are :class:`MultiHeadAttention`'s
projections around them (``module.mha``; self-attention, ``[B, N, C] -> [B, N, C]``; GQA/MQA through ``kv_heads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.core.dynamic import _BACKENDS as DYNAMIC_BACKENDS
from headwise.core.dynamic import block_select_attention, token_block_attention
from headwise.patterns import Causal
from headwise.selection.blocks import (
    VMOBA_PARTITIONS, hip_select, moba_select, vmoba_layer_partition, vmoba_partition,
    vmoba_select,
)
from headwise.checks import check_bool, check_positive_int
from headwise.variants.dynamic import _Projected, _ProjectionConfig
from headwise.variants.registry import register

__all__ = ["MoBAAttention", "VMoBAAttention", "HiPAttention", "moba_attention", "vmoba_attention", "hip_attention"]


# ---- functional cores ------------------------------------------------------------------------------------
def _finish(out: Tensor, selection, return_selection: bool):
    return (out, selection) if return_selection else out


def moba_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 512, topk: int = 3, causal: bool = True,
                   scale: float | None = None, backend: str = "auto", return_selection: bool = False):
    """MoBA attention over ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, N, D]`` -> ``[B, H, N, Dv]``.

    Each query attends to the tokens of its ``topk`` selected key blocks (:func:`~headwise.selection.moba_select`:
    own block + the ``topk - 1`` best earlier blocks by ``q . mean(block keys)``), with the token-level causal mask
    when ``causal``. ``return_selection`` also returns the selection, bool ``[B, H, N, ceil(N / block)]`` as
    passed to the engine (:func:`~headwise.core.dynamic.token_block_attention`).
    """
    with torch.no_grad():
        sel = moba_select(q.detach(), k.detach(), block=block, topk=topk, causal=causal)  # (B, H, N, nKB)
    out = token_block_attention(q, k, v, sel, block_kv=block, pattern=Causal() if causal else None, scale=scale,
                                backend=backend)
    return _finish(out, sel, return_selection)


def vmoba_attention(q: Tensor, k: Tensor, v: Tensor, *, grid: tuple[int, int, int], partition: str = "1d",
                    block=1, selection: str = "threshold", scope: str = "head", tau: float = 0.25, topk: int = 3,
                    scale: float | None = None, backend: str = "auto", return_selection: bool = False):
    """VMoBA attention (non-causal) over the ``N = T H W`` tokens of a video ``grid`` (row-major ``(T, H, W)``).

    The tokens are put in the block order of ``partition`` (``"1d"``, ``"2d"``, ``"3d"`` with ``block`` as in
    :func:`~headwise.selection.vmoba_partition`), blocks are selected by :func:`~headwise.selection.vmoba_select`
    (``selection``, ``scope``, ``tau``, ``topk``), attention runs over the selected blocks and the output is put back
    in the grid order. ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, N, D]`` -> ``[B, H, N, Dv]``.
    ``return_selection`` also returns the selection bool ``[B, H, N, blocks]`` (in the partition's token order).
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
    return _finish(out, sel, return_selection)


def hip_attention(q: Tensor, k: Tensor, v: Tensor, *, block: int = 64, topk: int = 8, window: int = 2,
                  causal: bool = True, scale: float | None = None, backend: str = "auto",
                  return_selection: bool = False):
    """HiP attention over ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, N, D]`` -> ``[B, H, N, Dv]``.

    Every query block of ``block`` queries attends to its ``window`` sliding-window key blocks and the ``topk``
    key blocks found by the tree search of :func:`~headwise.selection.hip_select` (token-level causal mask when
    ``causal``). ``return_selection`` also returns ``(kv_blocks, None)``.
    """
    with torch.no_grad():
        kv_blocks = hip_select(q.detach(), k.detach(), block=block, topk=topk, window=window, causal=causal)
    out = block_select_attention(q, k, v, kv_blocks, block_q=block, block_kv=block,
                                 pattern=Causal() if causal else None, scale=scale, backend=backend)
    return _finish(out, (kv_blocks, None), return_selection)


# ---- modules ---------------------------------------------------------------------------------------------
@dataclass
class _Config(_ProjectionConfig):  # dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as MHA
    backend: str = "auto"  # block_select_attention backend: "auto", "reference", "blocksparse"

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in DYNAMIC_BACKENDS:
            raise ValueError(f"unknown backend={self.backend!r}; valid: {', '.join(map(repr, DYNAMIC_BACKENDS))}")


class _BlockSelectAttention(_Projected):
    """:class:`MultiHeadAttention`'s projections (``self.mha``) around a functional core
    ``attend(q, k, v) -> [B, H, N, D]``; self-attention only."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        q, k, v = self.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        return self._finish(self.attend(q, k, v), x.shape[0], x.shape[1])  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        own = [f for f in c.__dataclass_fields__ if f not in _ProjectionConfig.__dataclass_fields__]
        return (f"dim={c.dim}, heads={c.heads}, kv_heads={c.kv_heads}, head_dim={c.head_dim}"
                + "".join(f", {f}={getattr(c, f)!r}" for f in own))


@register("moba")
class MoBAAttention(_BlockSelectAttention):
    r"""MoBA, Mixture of Block Attention (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs").

    The keys are split into blocks of ``block`` tokens; block ``c`` is represented by its mean key
    :math:`\bar k_c`. For query ``i`` (per head) the gate is :math:`s_{ic} = q_i \cdot \bar k_c`; the query attends
    to its own block ``i // block`` (always, counted in the ``topk``) and the ``topk - 1`` earlier blocks with the
    highest gates (causal: later blocks are excluded; inside the own block the token-level causal mask applies):

    .. math::

        o_i = \mathrm{softmax}\big(q_i K_{\mathcal S_i}^\top / \sqrt{D}\big) V_{\mathcal S_i},\qquad
        \mathcal S_i = \{\text{tokens } j \le i \text{ of the selected blocks}\}

    ``topk >= ceil(N / block)`` is full causal attention. Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; heads
    ``[B, H, N, D]``. Defaults ``block=512, topk=3`` (the paper's block size and top-k of its scaling experiments).

    Choices made here: the gates are not differentiated (the paper's gate has no parameters: the model learns
    through the attention over the chosen blocks); ties rank the lower block first; a shorter last block is
    represented by the mean of its tokens; ``causal=False`` (own block + best ``topk - 1`` others, no token mask)
    is an extension. No key padding mask, no cross-attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("moba(block=64, topk=3)", dim=256, heads=8)
        >>> m(torch.randn(2, 1000, 256)).shape
        torch.Size([2, 1000, 256])
    """

    @dataclass
    class Config(_Config):
        block: int = 512  # key (and query) block size in tokens
        topk: int = 3  # blocks each query visits, its own block included
        causal: bool = True  # causal attention: only earlier blocks compete, token-level mask in the own block

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("block", self.block)
            check_positive_int("topk", self.topk)
            check_bool("causal", self.causal)

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0, backend: str = "auto",
                 block: int = 512, topk: int = 3, causal: bool = True):
        super().__init__(self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                                     out_bias=out_bias, dropout=dropout, backend=backend, block=block, topk=topk,
                                     causal=causal))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.config
        return moba_attention(q, k, v, block=c.block, topk=c.topk, causal=c.causal, backend=c.backend)


@register("vmoba")
class VMoBAAttention(_BlockSelectAttention):
    r"""VMoBA, Mixture-of-Block Attention for video diffusion (Wu et al., 2025, "VMoBA: Mixture-of-Block Attention
    for Video Diffusion Models"), non-causal.

    MoBA's gates :math:`g_{ic} = q_i \cdot \bar k_c` over blocks of a ``(T, H, W)`` video grid, with the paper's
    three changes:

    1. layer-wise recurrent partition: layer ``l`` partitions the grid ``("1d", "2d", "3d")[l % 3]``:
       ``block_1d`` frames, ``block_2d = (bh, bw)`` patches through all frames, ``block_3d = (bt, bh, bw)`` cubes
       (:func:`~headwise.selection.vmoba_partition`); ``partition`` overrides the cycle;
    2. global block selection (``scope="head"``): all (query, block) pairs of a head compete together
       (``scope="query"``: per query, as in MoBA);
    3. threshold selection (``selection="threshold"``): the smallest set of pairs, own blocks first, whose
       min-max normalised gate mass reaches ``tau`` of the scope's total, with at least one pair beyond the own
       blocks (exact definition: :func:`~headwise.selection.vmoba_select`); or ``selection="topk"``.

    Every query also attends to its own block. Shapes: ``x`` ``[B, N, C]`` with ``N = T H W`` (row-major) ->
    ``[B, N, C]``. ``tau=1`` selects every block: full attention.

    Choices made here: the threshold rule follows the authors' code (min-max normalisation, ``eps = 1e-6``)
    since the paper states it in words; ``tau=0.25`` is that code's default; the default block shapes (1 frame,
    8 x 8, 4 x 8 x 8) are headwise's (the paper sizes them per model). Selection not differentiated; no key
    padding mask, no cross-attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("vmoba(grid=(4, 16, 16), layer=1)", dim=128, heads=4)   # layer 1: 2-D blocks
        >>> m(torch.randn(1, 1024, 128)).shape
        torch.Size([1, 1024, 128])
    """

    @dataclass
    class Config(_Config):
        grid: tuple[int, int, int] | None = None  # the video's (T, H, W) token grid, required
        layer: int = 0  # layer index: partition ("1d", "2d", "3d")[layer % 3]
        partition: str | None = None  # "1d", "2d" or "3d" overriding the layer cycle; None: from layer
        block_1d: int = 1  # frames per 1-D block
        block_2d: tuple[int, int] = (8, 8)  # (bh, bw) of a 2-D block (through all frames)
        block_3d: tuple[int, int, int] = (4, 8, 8)  # (bt, bh, bw) of a 3-D block
        selection: str = "threshold"  # "threshold" (gate mass reaches tau) or "topk"
        scope: str = "head"  # "head" (global selection over the head's (query, block) pairs) or "query"
        tau: float = 0.25  # threshold on the normalised gate mass, in [0, 1]
        topk: int = 3  # blocks per query (scope "head": topk * N pairs per head), own block included

        def __post_init__(self):
            super().__post_init__()
            if self.grid is None:
                raise ValueError("vmoba needs grid=(T, H, W), the video's token grid")
            self.grid = tuple(self.grid) if isinstance(self.grid, list) else self.grid
            self.block_2d, self.block_3d = tuple(self.block_2d), tuple(self.block_3d)
            cycle = vmoba_layer_partition(self.layer)  # checks layer >= 0
            if self.partition is None:
                self.partition = cycle
            elif self.partition not in VMOBA_PARTITIONS:
                raise ValueError(f"unknown partition={self.partition!r}; valid: None, "
                                 + ", ".join(map(repr, VMOBA_PARTITIONS)))
            vmoba_partition(self.grid, self.partition, self.block)  # checks the grid and the block shape
            if self.selection not in ("threshold", "topk"):
                raise ValueError(f"unknown selection={self.selection!r}; valid: 'threshold', 'topk'")
            if self.scope not in ("head", "query"):
                raise ValueError(f"unknown scope={self.scope!r}; valid: 'head', 'query'")
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
                raise ValueError(f"tau must be a number in [0, 1], got tau={self.tau!r}")
            check_positive_int("topk", self.topk)

        @property
        def block(self):
            """The block shape of the chosen partition."""
            return {"1d": self.block_1d, "2d": self.block_2d, "3d": self.block_3d}[self.partition]

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0, backend: str = "auto",
                 grid: tuple[int, int, int] | None = None, layer: int = 0, partition: str | None = None,
                 block_1d: int = 1, block_2d: tuple[int, int] = (8, 8), block_3d: tuple[int, int, int] = (4, 8, 8),
                 selection: str = "threshold", scope: str = "head", tau: float = 0.25, topk: int = 3):
        super().__init__(self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                                     out_bias=out_bias, dropout=dropout, backend=backend, grid=grid, layer=layer,
                                     partition=partition, block_1d=block_1d, block_2d=block_2d, block_3d=block_3d,
                                     selection=selection, scope=scope, tau=tau, topk=topk))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.config
        return vmoba_attention(q, k, v, grid=c.grid, partition=c.partition, block=c.block, selection=c.selection,
                               scope=c.scope, tau=c.tau, topk=c.topk, backend=c.backend)


@register("hip")
class HiPAttention(_BlockSelectAttention):
    r"""HiP, hierarchically pruned attention (Lee et al., 2024, "HiP Attention: Sparse Sub-Quadratic Attention with
    Hierarchical Attention Pruning"): training-free, ``O(N log N)``.

    Per query block of ``block`` queries, a tree search over the key blocks outside the sliding window: start from
    ``topk`` equal groups of blocks; repeatedly halve every group, score each half by its centre key
    (:math:`\max_{i \in \text{block}} q_i \cdot k_{centre}`) and keep the ``topk`` best halves, until every group is a
    single key block (:func:`~headwise.selection.hip_select`). The query block then attends to those ``topk``
    blocks and its ``window`` most recent blocks (its own included), with the token-level causal mask:

    .. math:: o_i = \mathrm{softmax}\big(q_i K_{\mathcal S_b}^\top / \sqrt{D}\big) V_{\mathcal S_b},\quad
              \mathcal S_b = \{j \le i: j // \mathrm{block} \in \mathrm{window}(b) \cup \mathrm{found}(b)\}

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; heads ``[B, H, N, D]``. With ``topk + window >= ceil(N / block)``
    it is full causal attention.

    Choices made here (from the paper's algorithm; its code was not used): the paper prunes to single tokens
    inside small key blocks and a query block shares one mask; we search at the granularity of ``block``-token key
    blocks (the engine's tiles), with ``block=64, topk=8`` (512 keys, the paper's ``k``) and a 2-block window as
    defaults; groups split as ``[lo, lo + ceil(size / 2))``; ties keep the lower position. ``causal=False``
    (window centred on the block) is an extension. Selection not differentiated; no key padding mask.

    Causality: keys after a query are always masked, but a query block's selection is scored with the max over
    *all* its queries (as the paper's blocked prefill does), so with ``block > 1`` an output can depend on later
    queries of its own block through which key blocks were found. That is harmless for training-free prefill
    (the paper's use) but a leak for autoregressive training: the arena's causality probe refuses ``hip`` on
    language tasks whenever pruning happens (e.g. ``hip(block=8, topk=2, window=1)`` at N = 64).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("hip(block=32, topk=4)", dim=256, heads=8)
        >>> m(torch.randn(2, 1000, 256)).shape
        torch.Size([2, 1000, 256])
    """

    @dataclass
    class Config(_Config):
        block: int = 64  # query and key block size in tokens
        topk: int = 8  # key blocks the tree search keeps per query block
        window: int = 2  # sliding-window key blocks per query block (the own block and window - 1 before it)
        causal: bool = True  # causal attention (the paper's LLM setting)

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("block", self.block)
            check_positive_int("topk", self.topk)
            check_positive_int("window", self.window)
            check_bool("causal", self.causal)

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0, backend: str = "auto",
                 block: int = 64, topk: int = 8, window: int = 2, causal: bool = True):
        super().__init__(self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                                     out_bias=out_bias, dropout=dropout, backend=backend, block=block, topk=topk,
                                     window=window, causal=causal))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.config
        return hip_attention(q, k, v, block=c.block, topk=c.topk, window=c.window, causal=c.causal, backend=c.backend)
