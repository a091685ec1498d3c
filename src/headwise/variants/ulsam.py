"""ULSAM, the Ultra-Lightweight Subspace Attention Module (Saini et al., WACV 2020) (registered as ``"ulsam"``).

The channels of a CNN feature map ``[B, C, H, W]`` are split into subspaces; each subspace gets one spatial
attention map (depthwise 1x1 convolution, 3x3 max-pool, pointwise convolution, softmax over positions) that
re-weights its channels. No dot-product attention. The module runs every subspace at once with grouped
convolutions; its reference, the paper's per-subspace loop, is :meth:`SubspaceAttention.naive_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_feature_map, check_positive_int
from headwise.variants.base import Capabilities, Variant
from headwise.variants.registry import register

__all__ = ["SubspaceAttention"]


@register("ulsam")
class SubspaceAttention(Variant):
    r"""Ultra-Lightweight Subspace Attention Module from "ULSAM: Ultra-Lightweight Subspace Attention Module for
    Compact Convolutional Neural Networks" (Saini et al., WACV 2020), on CNN feature maps.

    The ``C`` channels are split into ``g`` subspaces ``F_1..F_g`` of ``C/g`` channels; each gets one spatial
    attention map:

    .. math::

        A_n = \mathrm{softmax}\big(\mathrm{PW}^1(\mathrm{maxpool}^{3\times3,1}(\mathrm{DW}^{1\times1}(F_n)))\big),
        \qquad \hat F_n = (A_n \otimes F_n) \oplus F_n,
        \qquad \hat F = \mathrm{concat}(\hat F_1, \dots, \hat F_g)

    ``DW^{1x1}`` is a depthwise 1x1 convolution (a per-channel affine map), ``maxpool`` has kernel 3, stride 1,
    padding 1, ``PW^1`` is a pointwise convolution from the ``C/g`` channels of the subspace to one map, and the
    softmax runs over the ``H W`` positions. ``A_n`` ``[B, 1, H, W]`` multiplies every channel of ``F_n``.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]`` (``C = dim``, ``dim % groups == 0``).

    Args:
        dim: channels ``C``.
        groups: number of subspaces ``g`` (default 4; the paper sweeps 1 to 16).

    Choices made here: the equations above, without the batch norm and ReLU that the authors' released code puts
    after each convolution. The module runs all subspaces at once (grouped convolutions);
    :meth:`naive_forward` loops over subspaces and is the test reference. ``A_n`` is one map over positions,
    not a query-key matrix: ``inspect`` has no attention weights to show; the softmax over all positions means
    no causal mode.

    Example:
        >>> import torch, headwise
        >>> headwise.create("ulsam", dim=32, groups=4)(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    capabilities = Capabilities(layout="image", weights="none")
    example_config = {"dim": 16, "groups": 4}

    @dataclass
    class Config:
        dim: int  # channels C of the feature map [B, C, H, W]
        groups: int = 4  # number of channel subspaces g, dim % groups == 0

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("groups", self.groups)
            if self.dim % self.groups:
                raise ValueError(f"dim must be divisible by groups, got dim={self.dim} groups={self.groups}")

    def build(self, cfg) -> None:
        self.dw = nn.Conv2d(cfg.dim, cfg.dim, 1, groups=cfg.dim)  # DW^{1x1} of every subspace at once
        self.pw = nn.Conv2d(cfg.dim, cfg.groups, 1, groups=cfg.groups)  # PW^1: C/g channels -> 1 map, per subspace

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        check_feature_map("x", x, self.config.dim)
        B, C, H, W = x.shape
        g = self.config.groups
        s = self.pw(F.max_pool2d(self.dw(x), 3, stride=1, padding=1))  # (B, g, H, W)
        a = torch.softmax(s.flatten(2), dim=-1).view(B, g, 1, H, W)  # (B, g, 1, H, W)
        xg = x.view(B, g, C // g, H, W)  # (B, g, C/g, H, W)
        return (a * xg + xg).view(B, C, H, W)  # (B, C, H, W)

    def naive_forward(self, x: Tensor) -> Tensor:
        """The paper's per-subspace loop (reference for tests): one DW, maxpool, PW and softmax per subspace."""
        B, C, H, W = x.shape
        g = self.config.groups
        c = C // g
        outs = []
        for n in range(g):
            f = x[:, n * c:(n + 1) * c]  # (B, C/g, H, W)
            dw = F.conv2d(f, self.dw.weight[n * c:(n + 1) * c], self.dw.bias[n * c:(n + 1) * c], groups=c)
            s = F.conv2d(F.max_pool2d(dw, 3, stride=1, padding=1), self.pw.weight[n:n + 1], self.pw.bias[n:n + 1])
            a = torch.softmax(s.reshape(B, H * W), dim=-1).reshape(B, 1, H, W)  # (B, 1, H, W)
            outs.append(a * f + f)
        return torch.cat(outs, dim=1)  # (B, C, H, W)
