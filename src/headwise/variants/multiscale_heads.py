"""MEDUSA's multi-scale heads on one self-attention body (registered as ``"multiscale_heads"``).

Aboutalebi et al., 2021, "MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for
Medical Image Analysis": one attention body whose heads feed different scales. Here the body is softmax multi-head
self-attention (:func:`headwise.attention` with the module's pattern) and head group ``s`` is read out through its
slice of the output projection and average-pooled to scale ``s``. The reference is :func:`naive_multiscale_heads`
(:func:`headwise.variants.mha.naive_mha` with the other groups' output columns zeroed, then pooled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.checks import check_grid, check_positive_int
from headwise.variants.base import Capabilities, SoftmaxAttention
from headwise.variants.mha import naive_mha
from headwise.variants.registry import register

__all__ = ["MultiScaleHeads", "naive_multiscale_heads"]


@register("multiscale_heads")
class MultiScaleHeads(SoftmaxAttention):
    r"""Multi-scale heads on one self-attention body, after "MEDUSA: Multi-scale Encoder-Decoder Self-Attention
    Deep Neural Network Architecture for Medical Image Analysis" (Aboutalebi et al., 2021): a single
    self-attention body whose heads feed different scales of the network.

    The body is ordinary multi-head self-attention over the ``h x w`` token grid (one q/k/v projection, one
    attention for all heads). Its ``H`` heads are split into ``S = scales`` consecutive groups ``G_s`` of
    ``H / S`` heads; group ``s`` feeds scale ``s`` (grid downsampled by ``2^s``):

    .. math::

        o_h = \mathrm{softmax}(q_h k_h^\top / \sqrt{D})\, v_h, \qquad
        y_s = \mathrm{AvgPool}_{2^s}\Big(\sum_{h \in G_s} o_h W^O_h\Big) + b^O

    where ``W^O = [W^O_1 | ... | W^O_H]`` is the body's output projection split by head. With ``scales=1`` the
    module is exactly :class:`~headwise.variants.mha.MultiHeadAttention`; for any ``scales`` the un-pooled group
    outputs sum to the MHA output, so the heads partition one attention body rather than being separate
    attention modules.

    Shapes: ``x`` ``[B, N, C]`` with ``N = h w`` -> a tuple of ``scales`` tensors, ``y_s`` ``[B, N / 4^s, C]``
    on the ``h / 2^s x w / 2^s`` grid (row-major); inside, q is ``[B, H, N, D]``, k and v ``[B, H_kv, N, D]``.
    ``y_0`` (full resolution, group 0's heads only) has ``x``'s shape.

    Args:
        dim, heads, kv_heads, head_dim, pattern, causal, qkv_bias, out_bias, dropout, backend: as
            :class:`~headwise.variants.mha.MultiHeadAttention` (``pattern`` and ``causal`` restrict the body's
            attention).
        scales: number of scales ``S`` (default 2), ``heads % scales == 0``.
        grid: the token grid ``(h, w)`` (default None: a square grid ``sqrt(N) x sqrt(N)``, which then must
            exist); its sides must be divisible by ``2^(S-1)``. ``forward(x, grid=...)`` overrides it per call.

    Choices made here: MEDUSA's body is a convolutional encoder-decoder producing attention maps and its heads
    are small convolutional branches, whose exact layers the abstract does not give; here the "body" is a
    dot-product attention layer and a "head" is a group of its attention heads, pooled by averaging to its
    scale, so the mechanism (shared body, scale-specific heads) is what is kept. The grid sides must be
    divisible by ``2^(S-1)`` (no padding of odd sides: a 7 x 7 grid needs ``scales=1``). ``causal=True`` makes
    ``y_0`` causal (the body's attention is); the pooled scales average ``2^s x 2^s`` grid cells and are not
    per-token outputs.

    Example:
        >>> import torch, headwise
        >>> ys = headwise.create("multiscale_heads(scales=2)", dim=64, heads=4)(torch.randn(2, 64, 64))
        >>> [tuple(y.shape) for y in ys]
        [(2, 64, 64), (2, 16, 64)]
        >>> m = headwise.create("multiscale_heads(scales=2, grid=(4, 6))", dim=64, heads=4)
        >>> [tuple(y.shape) for y in m(torch.randn(2, 24, 64))]
        [(2, 24, 64), (2, 6, 64)]
    """

    capabilities = Capabilities(causal="optional", grid="optional", output="tuple")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "scales": 2, "grid": (2, 4)}

    @dataclass
    class Config(SoftmaxAttention.Config):
        scales: int = 2  # number of scales S; head group s feeds the grid downsampled by 2**s
        grid: tuple[int, int] | None = None  # token grid (h, w), sides divisible by 2**(scales-1); None: square

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("scales", self.scales)
            if self.heads % self.scales:
                raise ValueError(f"heads must be divisible by scales, got heads={self.heads} scales={self.scales}")
            if self.grid is not None:
                self.grid = check_grid("grid", self.grid, 2)
                _check_grid_divisible(self.grid, self.scales)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> tuple[Tensor, ...]:
        """``x`` ``[B, N, C]`` on ``grid`` ``(h, w)`` (default: the config's, else square) -> ``scales`` tensors
        ``[B, N/4^s, C]``."""
        q, k, v = self.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        B, N, C = x.shape
        h, w = self.resolve_grid(N, grid)
        S = self.config.scales
        o = self.attend(q, k, v)  # (B, H, N, D)
        G, D = self.heads // S, self.head_dim
        W = self.out_proj.weight.view(C, S, G * D)  # (C, S, G*D) column blocks per head group
        groups = o.view(B, S, G, N, D).transpose(2, 3).reshape(B, S, N, G * D)  # (B, S, N, G*D)
        outs = []
        for s in range(S):
            y = groups[:, s] @ W[:, s].T  # (B, N, C)
            if s:
                f = 2 ** s
                y = F.avg_pool2d(y.transpose(1, 2).reshape(B, C, h, w), f)  # (B, C, h/f, w/f)
                y = y.flatten(2).transpose(1, 2)  # (B, N/f^2, C)
            if self.out_proj.bias is not None:
                y = y + self.out_proj.bias
            outs.append(self.dropout(y))
        return tuple(outs)

    def unsupported_length(self, seq_len: int) -> str | None:
        """Without a configured grid the tokens must form a square grid whose side ``2**(scales-1)`` divides."""
        try:
            self.resolve_grid(seq_len)
        except ValueError as e:
            return str(e)
        return None

    def resolve_grid(self, N: int, grid=None) -> tuple[int, int]:
        """The grid ``(h, w)`` of ``N`` tokens: ``grid`` if given, else the config's, else square; checked."""
        if grid is None:
            grid = self.config.grid
        if grid is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"x has N={N} tokens, not a square grid; pass grid=(h, w)")
            grid = (side, side)
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid={grid} does not multiply to N={N}")
        _check_grid_divisible(grid, self.config.scales)
        return h, w


def _check_grid_divisible(grid, scales: int) -> None:
    """The sides of ``grid`` are divisible by ``2**(scales-1)`` (the coarsest scale's pooling)."""
    f = 2 ** (scales - 1)
    if grid[0] % f or grid[1] % f:
        raise ValueError(f"grid={grid} must be divisible by 2**(scales-1)={f} for scales={scales}")


def naive_multiscale_heads(m: MultiScaleHeads, x: Tensor, grid: tuple[int, int] | None = None) -> list[Tensor]:
    """Reference for :class:`MultiScaleHeads`: scale ``s`` is :func:`~headwise.variants.mha.naive_mha` with
    ``m``'s weights and every other head group's output-projection columns zeroed, average-pooled by ``2^s`` on
    the grid (no dropout)."""
    B, N, C = x.shape
    h, w = m.resolve_grid(N, grid)
    S = m.config.scales
    G, D = m.heads // S, m.head_dim
    outs = []
    for s in range(S):
        keep = torch.zeros(m.heads * D, dtype=m.out_proj.weight.dtype, device=x.device)
        keep[s * G * D:(s + 1) * G * D] = 1.0
        group = SimpleNamespace(q_proj=m.q_proj, k_proj=m.k_proj, v_proj=m.v_proj, heads=m.heads,
                                kv_heads=m.kv_heads, head_dim=D, attention_pattern=m.attention_pattern,
                                out_proj=SimpleNamespace(weight=m.out_proj.weight * keep, bias=m.out_proj.bias))
        full = naive_mha(group, x)  # (B, N, C): MHA with only group s's heads read out
        f = 2 ** s
        outs.append(F.avg_pool2d(full.transpose(1, 2).reshape(B, C, h, w), f).flatten(2).transpose(1, 2))
    return outs
