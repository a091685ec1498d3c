"""Vision attention modules built on structured patterns: MaxViT multi-axis attention (``"max_vit"``), HaloNet
blocked local attention with halo (``"halo"``) and TiC's attention in convolution windows (``"msa_conv"``, with
its multi-directional cyclic shift and inter-pooling).

Both are thin: each attention is a :class:`~headwise.variants.mha.MultiHeadAttention` restricted to a pattern
of :mod:`headwise.patterns.structured`, so every backend of :func:`headwise.attention` runs them (the block-sparse
engine visits only the tiles of the pattern). Inputs are batch-first token sequences ``[B, N, C]`` with the
``N = prod(grid)`` tokens of the 2-D (or 1-D / 3-D) grid flattened row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from headwise.core.attention import attention
from headwise.core.merge import merge_attention
from headwise.patterns.structured import ConvWindow, CyclicShift, Halo, MaxViTBlock, MaxViTGrid, directional_shifts
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = ["MaxViTAttention", "HaloAttention", "MSAConv", "pool_grid"]


def _check_dims(dim, heads) -> None:
    for name, value in (("dim", dim), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def _check_grid_tokens(x: Tensor, pattern) -> None:
    """``x`` must be ``[B, N, C]`` with the ``N = prod(grid)`` tokens of the pattern's grid."""
    if x.dim() != 3 or x.shape[1] != pattern.n:
        raise ValueError(f"x must be [B, N, C] with N = prod(grid={pattern.grid}) = {pattern.n}, "
                         f"got x.shape={tuple(x.shape)}")


@register("max_vit")
class MaxViTAttention(nn.Module):
    """Multi-axis attention of a MaxViT block (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022).

    Block attention (local: non-overlapping ``P x P`` windows, :class:`~headwise.patterns.MaxViTBlock`) followed by
    grid attention (sparse global: a ``G x G`` grid dilated over the image, :class:`~headwise.patterns.MaxViTGrid`),
    each pre-norm with a residual, as in the paper::

        x = x + BlockAttn(LN(x))        # each token mixes with its P x P window
        x = x + GridAttn(LN(x))         # then with the G x G tokens at its offset in every cell

    With ``P >= L / G`` per dim (e.g. ``P = G = 8`` on 64 x 64) every token reaches every other in these two
    steps. Shapes: ``x`` ``[B, N, C]`` with ``N = prod(grid)`` -> ``[B, N, C]``; heads ``[B, H, N, D]`` inside.
    Defaults ``window = grid_size = 7`` are the paper's; both must divide the grid (pad it beforehand).

    Deviations: no relative position bias, and the block's MBConv and MLPs are left to the surrounding network
    (this is the attention part of the block only).

    Example::

        >>> m = headwise.create("max_vit(grid=(16, 16), window=8, grid_size=8)", dim=64, heads=4)
        >>> m(torch.randn(2, 256, 64)).shape
        torch.Size([2, 256, 64])
    """

    @dataclass
    class Config:
        dim: int  # model width C of x [B, N, C]
        heads: int  # attention heads H of each of the two attentions
        grid: tuple[int, ...] | int  # token grid, e.g. (H, W); N = prod(grid), flattened row-major
        window: tuple[int, ...] | int = 7  # block attention window P per dim (divides the grid)
        grid_size: tuple[int, ...] | int = 7  # grid attention G per dim (divides the grid)
        head_dim: int | None = None  # per-head width D; None: dim // heads
        backend: str = "auto"  # headwise.attention backend of both attentions

        def __post_init__(self):
            _check_dims(self.dim, self.heads)
            if isinstance(self.grid, list):
                self.grid = tuple(self.grid)
            self.block_pattern = MaxViTBlock(self.grid, self.window)  # validates grid and window
            self.grid_pattern = MaxViTGrid(self.grid, self.grid_size)  # validates grid_size

    def __init__(self, dim: int, heads: int, *, grid, window=7, grid_size=7, head_dim: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, grid=grid, window=window, grid_size=grid_size,
                                        head_dim=head_dim, backend=backend)
        self.norm_block, self.norm_grid = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.block_attn = MultiHeadAttention(dim, heads, head_dim=head_dim, pattern=cfg.block_pattern, backend=backend)
        self.grid_attn = MultiHeadAttention(dim, heads, head_dim=head_dim, pattern=cfg.grid_pattern, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        _check_grid_tokens(x, self.config.block_pattern)
        x = x + self.block_attn(self.norm_block(x))  # (B, N, C)
        return x + self.grid_attn(self.norm_grid(x))  # (B, N, C)


@register("halo")
class HaloAttention(nn.Module):
    """Blocked local self-attention with halo (Vaswani et al., "Scaling Local Self-Attention for Parameter
    Efficient Visual Backbones", CVPR 2021): queries in ``b x b`` blocks attend the ``(b + 2h) x (b + 2h)``
    neighborhood of their block, cropped at the image border (:class:`~headwise.patterns.Halo`)::

        out = MultiHeadAttention(x) restricted to Halo(grid, block, halo)

    Shapes: ``x`` ``[B, N, C]`` with ``N = prod(grid)`` -> ``[B, N, C]``. Defaults ``block = 8, halo = 3`` are the
    paper's HaloNet setting. Deviation: no relative position embeddings (HaloNet adds them to the logits).

    Example::

        >>> m = headwise.create("halo(grid=(16, 16), block=8, halo=3)", dim=64, heads=4)
        >>> m(torch.randn(2, 256, 64)).shape
        torch.Size([2, 256, 64])
    """

    @dataclass
    class Config:
        dim: int  # model width C of x [B, N, C]
        heads: int  # attention heads H
        grid: tuple[int, ...] | int  # token grid, e.g. (H, W); N = prod(grid), flattened row-major
        block: tuple[int, ...] | int = 8  # query block b per dim
        halo: tuple[int, ...] | int = 3  # halo h per dim: keys extend the block by h on each side
        head_dim: int | None = None  # per-head width D; None: dim // heads
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            _check_dims(self.dim, self.heads)
            if isinstance(self.grid, list):
                self.grid = tuple(self.grid)
            self.pattern = Halo(self.grid, self.block, self.halo)  # validates grid, block, halo

    def __init__(self, dim: int, heads: int, *, grid, block=8, halo=3, head_dim: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, grid=grid, block=block, halo=halo, head_dim=head_dim,
                                        backend=backend)
        self.attn = MultiHeadAttention(dim, heads, head_dim=head_dim, pattern=cfg.pattern, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        _check_grid_tokens(x, self.config.pattern)
        return self.attn(x)  # (B, N, C)


def pool_grid(t: Tensor, grid: tuple[int, ...], cell: tuple[int, ...]) -> Tensor:
    """Average ``t`` ``[B, H, N, D]`` (``N = prod(grid)`` tokens, row-major) over non-overlapping ``cell`` boxes
    (``cell`` divides ``grid`` per dim) -> ``[B, H, M, D]`` with ``M = prod(grid / cell)``, cells row-major."""
    B, H, _, D = t.shape
    split = [s for g, c in zip(grid, cell) for s in (g // c, c)]
    boxes = t.reshape(B, H, *split, D)  # (B, H, g0/c0, c0, g1/c1, c1, ..., D)
    return boxes.mean(dim=tuple(3 + 2 * i for i in range(len(grid)))).reshape(B, H, -1, D)  # (B, H, M, D)


@register("msa_conv")
class MSAConv(nn.Module):
    """Multi-head self-attention inside convolution windows, MSA-Conv (Zhang et al., "TiC: Exploring Vision
    Transformer in Convolution", 2023), with TiC's two capacity-enhancing mechanisms as options (both off by
    default). Each token attends the receptive field of a stride-1, "same"-padded (dilated) convolution centred on
    it, cropped at the border (:class:`~headwise.patterns.ConvWindow`)::

        out = MultiHeadAttention(x) restricted to ConvWindow(grid, kernel_size, dilation)

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

    Choices and deviations: the TiC paper's exact definitions of the two mechanisms (shift amounts and directions,
    where the pooling sits and its size) were not available to us; the forms above are ours, built to match its
    description (long-distance connections across the borders; an enlarged effective receptive field). The
    released MSA-Conv kernel lets zero-padded keys enter the softmax; here padded keys are masked. Not
    implemented: strided (downsampling) windows.

    Example::

        >>> m = headwise.create("msa_conv(grid=(8, 8), shifts=2, pool=4)", dim=32, heads=4)
        >>> m(torch.randn(2, 64, 32)).shape
        torch.Size([2, 64, 32])
    """

    @dataclass
    class Config:
        dim: int  # model width C of x [B, N, C]
        heads: int  # attention heads H
        grid: tuple[int, ...] | int  # token grid, e.g. (H, W); N = prod(grid), flattened row-major
        kernel_size: tuple[int, ...] | int = 3  # odd convolution window per dim
        dilation: tuple[int, ...] | int = 1  # convolution dilation per dim
        head_dim: int | None = None  # per-head width D; None: dim // heads
        backend: str = "auto"  # headwise.attention backend
        shifts: int | tuple | None = None  # cyclic shift: an int a (+-a per dim) or one shift vector per head group
        pool: tuple[int, ...] | int | None = None  # inter-pooling cell per dim (divides the grid); None: off

        def __post_init__(self):
            _check_dims(self.dim, self.heads)
            if isinstance(self.grid, list):
                self.grid = tuple(self.grid)
            window = ConvWindow(self.grid, self.kernel_size, self.dilation)  # validates the window
            self.pattern = window
            if self.shifts is not None:
                if isinstance(self.shifts, bool):
                    raise ValueError(f"shifts must be an int, shift vectors or None, got shifts={self.shifts!r}")
                vectors = (directional_shifts(len(window.grid), self.shifts) if isinstance(self.shifts, int)
                           else self.shifts)
                self.pattern = CyclicShift(window, vectors, heads=self.heads)  # validates the vectors and heads
            if self.pool is not None:
                cell = (self.pool,) * len(window.grid) if isinstance(self.pool, int) else self.pool
                if (isinstance(self.pool, bool) or not isinstance(cell, (tuple, list)) or len(cell) != len(window.grid)
                        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cell)):
                    raise ValueError(f"pool must be a positive int or one per grid dim, got pool={self.pool!r}")
                if any(g % c for g, c in zip(window.grid, cell)):
                    raise ValueError(f"pool={self.pool!r} must divide grid={window.grid} in every dim")
                self.pool = tuple(cell)

    def __init__(self, dim: int, heads: int, *, grid, kernel_size=3, dilation=1, head_dim: int | None = None,
                 backend: str = "auto", shifts=None, pool=None):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, grid=grid, kernel_size=kernel_size, dilation=dilation,
                                        head_dim=head_dim, backend=backend, shifts=shifts, pool=pool)
        self.attn = MultiHeadAttention(dim, heads, head_dim=head_dim, pattern=cfg.pattern, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        cfg = self.config
        _check_grid_tokens(x, cfg.pattern)
        if cfg.pool is None:
            return self.attn(x)  # (B, N, C)
        q, k, v = self.attn.project(x)  # (B, H, N, D) each
        local, lse_local = attention(q, k, v, cfg.pattern, backend=cfg.backend, return_lse=True)  # (B, H, N, D)
        cells_k, cells_v = (pool_grid(t, cfg.pattern.grid, cfg.pool) for t in (k, v))  # (B, H, M, D)
        cells, lse_cells = attention(q, cells_k, cells_v, backend=cfg.backend, return_lse=True)  # (B, H, N, D)
        out, _ = merge_attention(local, lse_local, cells, lse_cells)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, N, H*D)
        return self.attn.dropout(self.attn.out_proj(out))  # (B, N, C)
