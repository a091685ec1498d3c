"""MaxViT's multi-axis attention (registered as ``"max_vit"``).

Tu et al., 2022, "MaxViT: Multi-Axis Vision Transformer" (ECCV): block attention in non-overlapping windows, then
grid attention over a dilated grid, each pre-norm with a residual. Each of the two is softmax attention
(:class:`~headwise.variants.base.SoftmaxAttention`) restricted to a pattern of :mod:`headwise.patterns.structured`
(:class:`~headwise.patterns.MaxViTBlock`, :class:`~headwise.patterns.MaxViTGrid`), so every backend of
:func:`headwise.attention` runs them (the block-sparse engine visits only the tiles of the pattern). The module's
reference is :func:`naive_max_vit`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from headwise.checks import check_tokens
from headwise.patterns.structured import MaxViTBlock, MaxViTGrid
from headwise.variants.base import Capabilities, ProjectedAttention, SoftmaxAttention, Variant, check_backend
from headwise.variants.mha import naive_mha
from headwise.variants.registry import register

__all__ = ["MaxViTAttention", "naive_max_vit"]


@register("max_vit")
class MaxViTAttention(Variant):
    """Multi-axis attention of a MaxViT block (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022).

    Block attention (local: non-overlapping ``P x P`` windows, :class:`~headwise.patterns.MaxViTBlock`) followed by
    grid attention (sparse global: a ``G x G`` grid dilated over the image, :class:`~headwise.patterns.MaxViTGrid`),
    each pre-norm with a residual, as in the paper::

        x = x + BlockAttn(LN(x))        # each token mixes with its P x P window
        x = x + GridAttn(LN(x))         # then with the G x G tokens at its offset in every cell

    With ``P >= L / G`` per dim (e.g. ``P = G = 8`` on 64 x 64) every token reaches every other in these two
    steps. Shapes: ``x`` ``[B, N, C]`` with ``N = prod(grid)`` (tokens flattened row-major) -> ``[B, N, C]``; heads
    ``[B, H, N, D]`` inside. Defaults ``window = grid_size = 7`` are the paper's; both must divide the grid (pad it
    beforehand).

    Fields (:class:`MaxViTAttention.Config`): those of :class:`~headwise.variants.base.ProjectedAttention`
    (``dim``, ``heads``, ``kv_heads``, ``head_dim``, ``qkv_bias``, ``out_bias``, ``dropout``), shared by the two
    attentions ``block_attn`` and ``grid_attn`` (each a :class:`~headwise.variants.base.SoftmaxAttention` with
    its own projections), and ``grid`` (required), ``window`` (``P`` per dim), ``grid_size`` (``G`` per dim),
    ``backend``.

    Deviations: no relative position bias, and the block's MBConv and MLPs are left to the surrounding network
    (this is the attention part of the block only).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("max_vit(grid=(16, 16), window=8, grid_size=8)", dim=64, heads=4)
        >>> m(torch.randn(2, 256, 64)).shape
        torch.Size([2, 256, 64])
    """

    capabilities = Capabilities(grid="required")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "grid": (3, 9), "window": (3, 3), "grid_size": (3, 3)}

    @dataclass
    class Config(ProjectedAttention.Config):
        grid: tuple[int, ...] | int | None = None  # token grid, e.g. (H, W); N = prod(grid), flattened row-major; required
        window: tuple[int, ...] | int = 7  # block attention window P per dim (divides the grid)
        grid_size: tuple[int, ...] | int = 7  # grid attention G per dim (divides the grid)
        backend: str = "auto"  # headwise.attention backend of both attentions

        def __post_init__(self):
            super().__post_init__()
            if self.grid is None:
                raise ValueError("max_vit needs grid=(H, W) (or (N,), (T, H, W)), the token grid; got grid=None")
            self.grid = MaxViTBlock(self.grid, self.window).grid  # validates grid and window
            MaxViTGrid(self.grid, self.grid_size)  # validates grid_size
            check_backend(self.backend)

    def build(self, cfg) -> None:
        self.norm_block, self.norm_grid = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        shared = dict(dim=cfg.dim, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                      qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, dropout=cfg.dropout, backend=cfg.backend)
        self.block_attn = SoftmaxAttention(pattern=MaxViTBlock(cfg.grid, cfg.window), **shared)
        self.grid_attn = SoftmaxAttention(pattern=MaxViTGrid(cfg.grid, cfg.grid_size), **shared)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        grid = self.config.grid
        check_tokens("x", x, self.config.dim)
        if x.shape[1] != math.prod(grid):
            raise ValueError(f"x must be [B, N, C] with N = prod(grid={grid}) = {math.prod(grid)}, "
                             f"got x.shape={tuple(x.shape)}")
        x = x + self.block_attn(self.norm_block(x))  # (B, N, C)
        return x + self.grid_attn(self.norm_grid(x))  # (B, N, C)


def naive_max_vit(m: MaxViTAttention, x: Tensor) -> Tensor:
    """The reference of :class:`MaxViTAttention` with the module's own weights: each attention is
    :func:`~headwise.variants.mha.naive_mha` with the dense mask of the paper's pattern, built here from the config
    (not taken from the module), around the module's layer norms and the residuals. ``x`` ``[B, N, C]``; the output
    dropout is not applied (compare in ``eval()`` mode)."""
    cfg = m.config
    x = x + naive_mha(m.block_attn, m.norm_block(x), pattern=MaxViTBlock(cfg.grid, cfg.window))  # (B, N, C)
    return x + naive_mha(m.grid_attn, m.norm_grid(x), pattern=MaxViTGrid(cfg.grid, cfg.grid_size))  # (B, N, C)
