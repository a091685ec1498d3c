"""Large Kernel Attention from "Visual Attention Network" (Guo et al., 2022) (registered as ``"lka"``).

A ``K x K`` convolution decomposed into a depthwise, a dilated depthwise and a pointwise convolution builds an
attention map that multiplies the CNN feature map ``[B, C, H, W]``: no softmax, no attention matrix. No
functional core beyond ``torch.nn.functional.conv2d``; the tests check the module against delta kernels and
its receptive field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from headwise.checks import check_feature_map, check_positive_int
from headwise.variants.base import Capabilities, Variant
from headwise.variants.registry import register

__all__ = ["LargeKernelAttention"]


@register("lka")
class LargeKernelAttention(Variant):
    r"""Large Kernel Attention from "Visual Attention Network" (Guo et al., 2022), on CNN feature maps.

    A ``K x K`` convolution is decomposed into a ``(2d-1) x (2d-1)`` depthwise convolution, a
    ``ceil(K/d) x ceil(K/d)`` depthwise convolution with dilation ``d`` and a ``1 x 1`` convolution; the result
    is an attention map that multiplies the input:

    .. math::

        \mathrm{Attention} = \mathrm{Conv}_{1\times1}(\mathrm{DW\text{-}D\text{-}Conv}(\mathrm{DW\text{-}Conv}(F))),
        \qquad \mathrm{Output} = \mathrm{Attention} \otimes F

    Shapes: ``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]`` (``C = dim``); padding keeps ``H, W``.

    Args:
        dim: channels ``C``.
        kernel_size: the large kernel ``K`` being decomposed (odd, default 21 as in VAN).
        dilation: dilation ``d`` (default 3): the paper's ``K=21, d=3`` gives a 5x5 depthwise and a 7x7
            depthwise convolution with dilation 3.

    Choices made here: ``ceil(K/d)`` is rounded up to the next odd size so that padding keeps the spatial size
    (it is already odd for the paper's K=21, d=3). This is the LKA unit only; VAN's "attention" sub-block wraps
    it as ``x + proj_2(LKA(GELU(proj_1(x))))`` with 1x1 ``proj_1``/``proj_2``, left to the caller. The zero
    padding of the convolutions makes the map depend on every neighbour in both directions: there is no causal
    mode, and no attention matrix for ``inspect``.

    Example:
        >>> import torch, headwise
        >>> headwise.create("lka", dim=32)(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    capabilities = Capabilities(layout="image", weights="none")
    example_config = {"dim": 16, "kernel_size": 7, "dilation": 2}

    @dataclass
    class Config:
        dim: int  # channels C of the feature map [B, C, H, W]
        kernel_size: int = 21  # the large kernel K that the three convolutions decompose (odd)
        dilation: int = 3  # dilation d of the depthwise dilated convolution

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("kernel_size", self.kernel_size)
            check_positive_int("dilation", self.dilation)
            if self.kernel_size % 2 == 0 or self.kernel_size < 3:
                raise ValueError(f"kernel_size must be an odd int >= 3, got kernel_size={self.kernel_size}")
            if self.dilation > self.kernel_size:
                raise ValueError(f"dilation must not exceed kernel_size, got dilation={self.dilation} "
                                 f"kernel_size={self.kernel_size}")

    def build(self, cfg) -> None:
        C, d = cfg.dim, cfg.dilation
        local, far = self.local_size, self.dilated_size
        self.conv0 = nn.Conv2d(C, C, local, padding=local // 2, groups=C)
        self.conv_spatial = nn.Conv2d(C, C, far, padding=d * (far // 2), dilation=d, groups=C)
        self.conv1 = nn.Conv2d(C, C, 1)

    @property
    def local_size(self) -> int:
        """Side ``2d - 1`` of the depthwise kernel."""
        return 2 * self.config.dilation - 1

    @property
    def dilated_size(self) -> int:
        """Side of the dilated depthwise kernel: ``ceil(K / d)``, rounded up to odd so "same" padding exists."""
        far = math.ceil(self.config.kernel_size / self.config.dilation)
        return far + 1 - far % 2

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        check_feature_map("x", x, self.config.dim)
        attn = self.conv1(self.conv_spatial(self.conv0(x)))  # (B, C, H, W)
        return attn * x  # (B, C, H, W)
