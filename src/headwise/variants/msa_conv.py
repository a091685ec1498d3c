"""TiC's multi-head self-attention in convolution windows, MSA-Conv (registered as ``"msa_conv"``).

Zhang et al., 2023, "TiC: Exploring Vision Transformer in Convolution": each token attends the receptive field of
a convolution centred on it (:class:`~headwise.patterns.ConvWindow`), with TiC's multi-directional cyclic shift
(:class:`~headwise.patterns.structured.CyclicShift`) and inter-pooling (:func:`pool_grid`) as options. Softmax
attention (:class:`~headwise.variants.base.SoftmaxAttention`) with that pattern, so every backend of
:func:`headwise.attention` runs it; with inter-pooling, a second call over the pooled cells merged by
log-sum-exp. The module's reference is :func:`naive_msa_conv`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.checks import check_tokens
from headwise.core.attention import attention
from headwise.core.merge import merge_attention
from headwise.patterns import Pattern
from headwise.patterns.structured import ConvWindow, CyclicShift, directional_shifts
from headwise.variants.base import Capabilities, SoftmaxAttention, naive_projections
from headwise.variants.registry import register

__all__ = ["MSAConv", "pool_grid", "naive_msa_conv", "naive_cell_average"]


def pool_grid(t: Tensor, grid: tuple[int, ...], cell: tuple[int, ...]) -> Tensor:
    """Average ``t`` ``[B, H, N, D]`` (``N = prod(grid)`` tokens, row-major) over non-overlapping ``cell`` boxes
    (``cell`` divides ``grid`` per dim) -> ``[B, H, M, D]`` with ``M = prod(grid / cell)``, cells row-major."""
    B, H, _, D = t.shape
    split = [s for g, c in zip(grid, cell) for s in (g // c, c)]
    boxes = t.reshape(B, H, *split, D)  # (B, H, g0/c0, c0, g1/c1, c1, ..., D)
    return boxes.mean(dim=tuple(3 + 2 * i for i in range(len(grid)))).reshape(B, H, -1, D)  # (B, H, M, D)


@register("msa_conv")
class MSAConv(SoftmaxAttention):
    """Multi-head self-attention inside convolution windows, MSA-Conv (Zhang et al., "TiC: Exploring Vision
    Transformer in Convolution", 2023), with TiC's two capacity-enhancing mechanisms as options (both off by
    default). Each token attends the receptive field of a stride-1, "same"-padded (dilated) convolution centred on
    it, cropped at the border (:class:`~headwise.patterns.ConvWindow`)::

        out = softmax(q k^T / sqrt(D) + mask) v,  mask = -inf outside ConvWindow(grid, kernel_size, dilation)

    * ``shifts`` (multi-directional cyclic shift, :class:`~headwise.patterns.structured.CyclicShift`): head group
      ``g`` runs its window attention on the grid cyclically rolled by ``shifts[g]`` and rolls the result back,
      i.e. per head ``softmax(q k^T / sqrt(D) + M_g) v`` with ``M_g(i, j) = ConvWindow(roll_g(i), roll_g(j))``;
      windows wrap around the image borders, at a different seam per group. An int ``a`` is
      :func:`~headwise.patterns.structured.directional_shifts` ``(ndim, a)``: ``+a`` and ``-a`` along each dim,
      ``2 ndim`` head groups (``heads`` must be a multiple).
    * ``pool`` (inter-pooling): keys and values are also average-pooled over non-overlapping ``pool`` cells of the
      grid (:func:`pool_grid`, ``M = N / prod(pool)`` cell tokens), and every query attends its window *and* all
      cell tokens in one softmax::

          out_i = sum_{j in W(i)} p_ij v_j + sum_c p_ic vbar_c,   p = softmax over {q_i.k_j : j in W(i)} u {q_i.kbar_c}

      computed as two :func:`headwise.attention` calls merged by log-sum-exp (:func:`headwise.merge_attention`).
      The pooled tokens connect windows with each other (a global, coarse receptive field); with ``shifts``
      too, the cells are those of the unshifted grid, shared by all heads.

    The window depends on no absolute position, so the module runs on any grid size without retraining (the
    paper's motivation). Shapes: ``x`` ``[B, N, C]`` with ``N = prod(grid)`` -> ``[B, N, C]``; heads
    ``[B, H, N, D]`` inside. ``kernel_size = 3`` by default (a choice).

    Fields (:class:`MSAConv.Config`): those of :class:`~headwise.variants.base.SoftmaxAttention` (``dim``,
    ``heads``, ``kv_heads``, ``head_dim``, biases, ``dropout``, ``backend``; ``pattern`` and ``causal`` further
    restrict the window, by intersection; ``causal`` is refused with ``pool``, whose cells average later tokens),
    and ``grid`` (required), ``kernel_size``, ``dilation``, ``shifts``, ``pool``.

    Choices and deviations: the TiC paper's exact definitions of the two mechanisms (shift amounts and directions,
    where the pooling sits and its size) were not available to us; the forms above are ours, built to match its
    description (long-distance connections across the borders; an enlarged effective receptive field). The
    released MSA-Conv kernel lets zero-padded keys enter the softmax; here padded keys are masked. Not
    implemented: strided (downsampling) windows.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("msa_conv(grid=(8, 8), shifts=2, pool=4)", dim=32, heads=4)
        >>> m(torch.randn(2, 64, 32)).shape
        torch.Size([2, 64, 32])
    """

    capabilities = Capabilities(causal="optional", grid="required", softmax=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "grid": (5, 7), "kernel_size": 3, "shifts": 1}

    @dataclass
    class Config(SoftmaxAttention.Config):
        pattern: Pattern | str | None = None  # a further restriction (Pattern or spec string), intersected with the window
        grid: tuple[int, ...] | int | None = None  # token grid, e.g. (H, W); N = prod(grid), flattened row-major; required
        kernel_size: tuple[int, ...] | int = 3  # odd convolution window per dim
        dilation: tuple[int, ...] | int = 1  # convolution dilation per dim
        shifts: int | tuple | None = None  # cyclic shift: an int a (+-a per dim) or one shift vector per head group
        pool: tuple[int, ...] | int | None = None  # inter-pooling cell per dim (divides the grid); None: off

        def __post_init__(self):
            super().__post_init__()
            if self.grid is None:
                raise ValueError("msa_conv needs grid=(H, W) (or (N,), (T, H, W)), the token grid; got grid=None")
            window = self.window()  # validates grid, kernel_size, dilation, shifts
            self.grid = window.grid
            if self.pool is not None:
                cell = (self.pool,) * len(self.grid) if isinstance(self.pool, int) else self.pool
                if (isinstance(self.pool, bool) or not isinstance(cell, (tuple, list)) or len(cell) != len(self.grid)
                        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cell)):
                    raise ValueError(f"pool must be a positive int or one per grid dim, got pool={self.pool!r}")
                if any(g % c for g, c in zip(self.grid, cell)):
                    raise ValueError(f"pool={self.pool!r} must divide grid={self.grid} in every dim")
                self.pool = tuple(cell)
                if self.causal:
                    raise ValueError(f"msa_conv has no causal mode with inter-pooling (each cell averages later "
                                     f"tokens too), got causal=True pool={self.pool}")

        def window(self) -> Pattern:
            """The window pattern: ``ConvWindow`` (grid, kernel_size, dilation), cyclically shifted per head group
            when ``shifts`` is set."""
            window = ConvWindow(self.grid, self.kernel_size, self.dilation)
            if self.shifts is None:
                return window
            if isinstance(self.shifts, bool):
                raise ValueError(f"shifts must be an int, shift vectors or None, got shifts={self.shifts!r}")
            vectors = directional_shifts(len(window.grid), self.shifts) if isinstance(self.shifts, int) else self.shifts
            return CyclicShift(window, vectors, heads=self.heads)  # validates the vectors and heads

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """With inter-pooling: no causal mode, and the attention step is two merged calls (not the pattern's)."""
        if config.pool is None:
            return cls.capabilities
        return dataclasses.replace(cls.capabilities, causal="none", softmax=False)

    def structural_pattern(self, cfg) -> Pattern:
        return cfg.window()

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        grid = self.config.grid
        check_tokens("x", x, self.dim)
        if x.shape[1] != math.prod(grid):
            raise ValueError(f"x must be [B, N, C] with N = prod(grid={grid}) = {math.prod(grid)}, "
                             f"got x.shape={tuple(x.shape)}")
        return super().forward(x)  # (B, N, C)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Window attention; with ``pool``, merged with the attention over the pooled cells."""
        cfg = self.config
        if cfg.pool is None:
            return super().attend(q, k, v)  # (B, H, N, D)
        local, lse_local = attention(q, k, v, self.pattern, backend=cfg.backend, return_lse=True)  # (B, H, N, D)
        cells_k, cells_v = (pool_grid(t, cfg.grid, cfg.pool) for t in (k, v))  # (B, H_kv, M, D)
        cells, lse_cells = attention(q, cells_k, cells_v, backend=cfg.backend, return_lse=True)  # (B, H, N, D)
        return merge_attention(local, lse_local, cells, lse_cells)[0]  # (B, H, N, D)


def naive_cell_average(grid: tuple[int, ...], cell: tuple[int, ...]) -> Tensor:
    """The ``[M, N]`` float64 averaging matrix of the non-overlapping ``cell`` boxes of ``grid`` (cells and tokens
    row-major), written with explicit coordinates: the reference of :func:`pool_grid` (``pool_grid(t) = A t``)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    cell_of = torch.zeros(len(coords), dtype=torch.long)  # (N,) the cell of each token
    for d, (g, c) in enumerate(zip(grid, cell)):
        cell_of = cell_of * (g // c) + coords[:, d] // c
    onehot = F.one_hot(cell_of).T.double()  # (M, N)
    return onehot / onehot.sum(1, keepdim=True)


def naive_msa_conv(m: MSAConv, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The reference of :class:`MSAConv`, written out with the module's own weights: ``F.linear`` projections,
    materialized scores over the ``N`` tokens (and, with ``pool``, the ``M`` cell tokens ``A k``, ``A v`` of
    :func:`naive_cell_average`), the dense mask, one softmax, output projection.

    ``mask``: ``[N, N]`` or ``[H, N, N]`` bool, the allowed (query, token) pairs; default the dense mask of the
    module's pattern. The cell tokens are open to every query. ``x`` ``[B, N, C]`` -> ``[B, N, C]``; the output
    dropout is not applied (compare in ``eval()`` mode).
    """
    cfg = m.config
    B, N, _ = x.shape
    H, H_kv, D = m.heads, m.kv_heads, m.head_dim
    q, k, v = naive_projections(m, x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
    k, v = (t.repeat_interleave(H // H_kv, dim=1) for t in (k, v))  # (B, H, N, D)
    allowed = (m.pattern.dense_mask(N, N) if mask is None else mask).to(x.device).expand(H, N, N)  # (H, N, N)
    if cfg.pool is not None:
        avg = naive_cell_average(cfg.grid, cfg.pool).to(x)  # (M, N)
        k, v = torch.cat([k, avg @ k], 2), torch.cat([v, avg @ v], 2)  # (B, H, N + M, D)
        allowed = torch.cat([allowed, allowed.new_ones(H, N, avg.shape[0])], -1)  # (H, N, N + M)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, -math.inf)  # (B, H, N, N [+ M])
    out = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
