"""Vision attention modules built on structured patterns: MaxViT multi-axis attention (``"max_vit"``), HaloNet
blocked local attention with halo (``"halo"``) and TiC's attention in convolution windows (``"msa_conv"``).

Both are thin: each attention is a :class:`~headwise.variants.softmax.MultiHeadAttention` restricted to a pattern
of :mod:`headwise.patterns.structured`, so every backend of :func:`headwise.attention` runs them (the block-sparse
engine visits only the tiles of the pattern). Inputs are batch-first token sequences ``[B, N, C]`` with the
``N = prod(grid)`` tokens of the 2-D (or 1-D / 3-D) grid flattened row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from headwise.patterns.structured import ConvWindow, Halo, MaxViTBlock, MaxViTGrid
from headwise.variants.registry import register
from headwise.variants.softmax import MultiHeadAttention

__all__ = ["MaxViTAttention", "HaloAttention", "MSAConv"]


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


@register("msa_conv")
class MSAConv(nn.Module):
    """Multi-head self-attention inside convolution windows, MSA-Conv (Zhang et al., "TiC: Exploring Vision
    Transformer in Convolution", 2023): each token attends the receptive field of a stride-1, "same"-padded
    (dilated) convolution centred on it, cropped at the border (:class:`~headwise.patterns.ConvWindow`)::

        out = MultiHeadAttention(x) restricted to ConvWindow(grid, kernel_size, dilation)

    The window depends on no absolute position, so the module runs on any grid size without retraining (the
    paper's motivation). Shapes: ``x`` ``[B, N, C]`` with ``N = prod(grid)`` -> ``[B, N, C]``. ``kernel_size = 3``
    by default (a choice). Not implemented: TiC's multi-directional cyclic shift and inter-pooling (their exact
    definitions were not available to us), and strided (downsampling) windows.
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

        def __post_init__(self):
            _check_dims(self.dim, self.heads)
            if isinstance(self.grid, list):
                self.grid = tuple(self.grid)
            self.pattern = ConvWindow(self.grid, self.kernel_size, self.dilation)  # validates the window

    def __init__(self, dim: int, heads: int, *, grid, kernel_size=3, dilation=1, head_dim: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, grid=grid, kernel_size=kernel_size, dilation=dilation,
                                        head_dim=head_dim, backend=backend)
        self.attn = MultiHeadAttention(dim, heads, head_dim=head_dim, pattern=cfg.pattern, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        _check_grid_tokens(x, self.config.pattern)
        return self.attn(x)  # (B, N, C)
