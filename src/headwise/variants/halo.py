"""HaloNet's blocked local self-attention with a halo (registered as ``"halo"``).

Vaswani et al., 2021, "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (CVPR): queries in
``b x b`` blocks attend the block extended by ``h`` tokens on each side. The module is softmax attention
(:class:`~headwise.variants.base.SoftmaxAttention`) restricted to the pattern
:class:`~headwise.patterns.Halo`, so every backend of :func:`headwise.attention` runs it (the block-sparse engine
visits only the tiles of the pattern); its reference is :func:`headwise.variants.mha.naive_mha` with that pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from headwise.checks import check_tokens
from headwise.patterns import Pattern
from headwise.patterns.structured import Halo
from headwise.variants.base import Capabilities, SoftmaxAttention
from headwise.variants.registry import register

__all__ = ["HaloAttention"]


@register("halo")
class HaloAttention(SoftmaxAttention):
    """Blocked local self-attention with halo (Vaswani et al., "Scaling Local Self-Attention for Parameter
    Efficient Visual Backbones", CVPR 2021): queries in ``b x b`` blocks attend the ``(b + 2h) x (b + 2h)``
    neighborhood of their block, cropped at the image border (:class:`~headwise.patterns.Halo`)::

        out = softmax(q k^T / sqrt(D) + mask) v,  mask = -inf outside Halo(grid, block, halo)

    Shapes: ``x`` ``[B, N, C]`` with the ``N = prod(grid)`` tokens of the grid flattened row-major -> ``[B, N, C]``;
    heads ``[B, H, N, D]`` inside. Defaults ``block = 8, halo = 3`` are the paper's HaloNet setting.

    Fields (:class:`HaloAttention.Config`): those of :class:`~headwise.variants.base.SoftmaxAttention` (``dim``,
    ``heads``, ``kv_heads``, ``head_dim``, biases, ``dropout``, ``backend``; ``pattern`` and ``causal`` further
    restrict the halo pattern, by intersection), and ``grid`` (required: ``(N,)``, ``(H, W)`` or ``(T, H, W)``),
    ``block`` (query block ``b`` per dim) and ``halo`` (``h`` per dim, >= 0).

    Deviation: no relative position embeddings (HaloNet adds them to the logits). A grid that ``block`` does not
    divide gets a smaller last block per dim instead of padding.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("halo(grid=(16, 16), block=8, halo=3)", dim=64, heads=4)
        >>> m(torch.randn(2, 256, 64)).shape
        torch.Size([2, 256, 64])
    """

    capabilities = Capabilities(causal="optional", grid="required", softmax=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "grid": (5, 7), "block": 3, "halo": 1}

    @dataclass
    class Config(SoftmaxAttention.Config):
        pattern: Pattern | str | None = None  # a further restriction (Pattern or spec string), intersected with the halo; None: none
        grid: tuple[int, ...] | int | None = None  # token grid, e.g. (H, W); N = prod(grid), flattened row-major; required
        block: tuple[int, ...] | int = 8  # query block b per dim
        halo: tuple[int, ...] | int = 3  # halo h per dim: keys extend the block by h on each side

        def __post_init__(self):
            super().__post_init__()
            if self.grid is None:
                raise ValueError("halo needs grid=(H, W) (or (N,), (T, H, W)), the token grid; got grid=None")
            self.grid = Halo(self.grid, self.block, self.halo).grid  # validates grid, block and halo

    def structural_pattern(self, cfg) -> Pattern:
        return Halo(cfg.grid, cfg.block, cfg.halo)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = prod(grid)``) -> ``[B, N, C]``."""
        grid = self.config.grid
        check_tokens("x", x, self.dim)
        if x.shape[1] != math.prod(grid):
            raise ValueError(f"x must be [B, N, C] with N = prod(grid={grid}) = {math.prod(grid)}, "
                             f"got x.shape={tuple(x.shape)}")
        return super().forward(x)  # (B, N, C)
