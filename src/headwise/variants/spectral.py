"""SpectFormer's spectral gating token mixer (registered as ``"spectral"``).

Patro, Namboodiri and Agneeswaran, 2023, "SpectFormer: Frequency and Attention is what you need in a Vision
Transformer", with the global filter of GFNet (Rao et al., 2021): tokens on a patch grid are multiplied by a
learned filter in the 2-D Fourier domain, a circular convolution over the grid. No attention matrix. The
reference is :func:`naive_circular_conv` (the convolution written out with rolls).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.checks import check_positive_int, check_tokens
from headwise.variants.base import Capabilities, Variant
from headwise.variants.registry import register

__all__ = ["SpectralGating", "naive_circular_conv"]


@register("spectral")
class SpectralGating(Variant):
    r"""SpectFormer's spectral gating token mixer, from "SpectFormer: Frequency and Attention is what you need in a
    Vision Transformer" (Patro, Namboodiri and Agneeswaran, 2023), the GFNet global filter (Rao et al., 2021).

    Tokens ``[B, N, C]`` on an ``h x w`` patch grid (``N = h w``) are mixed by a learnable global filter in the
    frequency domain:

    .. math::

        X = \mathcal{F}_{2D}[x], \qquad \tilde X = K \odot X, \qquad y = \mathcal{F}^{-1}_{2D}[\tilde X]

    with the real 2-D FFT over the grid (``norm="ortho"``) and ``K`` a complex filter ``[h, w//2+1, C]``, one
    per channel. Multiplying by ``K`` is a circular convolution over the grid with the kernel
    ``irfft2(K)`` (unnormalized), so ``K = 1`` is the identity. SpectFormer stacks these blocks (as
    ``x + spectral(LN(x))`` followed by an MLP) in the early layers and attention blocks in the later ones.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``, token ``n`` at grid row ``n // w``, column ``n % w``.

    Args:
        dim: channels ``C``.
        grid: the patch grid ``(h, w)`` (an int for a square grid); the filter's size depends on it, so it is
            required and ``N = h w`` is fixed.

    Choices made here: the filter is initialised as ``1 + 0.02 * N(0, 1)`` (real and imaginary parts),
    i.e. near the identity, whereas GFNet draws ``0.02 * N(0, 1)``; the FFT runs in float32 at least (half
    precision inputs are cast up and back). There is no class token: remove it before this layer. The circular
    convolution mixes every token with every other: no causal mode, and no attention matrix for ``inspect``.

    Example:
        >>> import torch, headwise
        >>> headwise.create("spectral(grid=(14, 14))", dim=64)(torch.randn(2, 196, 64)).shape
        torch.Size([2, 196, 64])
    """

    capabilities = Capabilities(grid="required", weights="none")
    example_config = {"dim": 16, "grid": (3, 5)}

    @dataclass
    class Config:
        dim: int  # channels C of the tokens [B, N, C]
        grid: tuple[int, int] | int  # patch grid (h, w) with N = h * w (an int means a square grid)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            grid = self.grid
            if isinstance(grid, int) and not isinstance(grid, bool):
                grid = (grid, grid)
            if not (isinstance(grid, (tuple, list)) and len(grid) == 2
                    and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
                raise ValueError(f"grid must be (h, w) positive ints or one int for a square grid, got grid={grid!r}")
            self.grid = (int(grid[0]), int(grid[1]))

    def build(self, cfg) -> None:
        h, w = cfg.grid
        weight = torch.zeros(h, w // 2 + 1, cfg.dim, 2)
        weight[..., 0] = 1.0
        self.filter = nn.Parameter(weight + 0.02 * torch.randn_like(weight))  # (h, w//2+1, C, 2) real, imag

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, h w, C]`` -> ``[B, h w, C]``."""
        h, w = self.config.grid
        check_tokens("x", x, self.config.dim, tokens=h * w)
        B, N, C = x.shape
        dtype = x.dtype
        xf = x.view(B, h, w, C).to(torch.promote_types(dtype, torch.float32))  # (B, h, w, C)
        X = torch.fft.rfft2(xf, dim=(1, 2), norm="ortho")  # (B, h, w//2+1, C) complex
        X = X * torch.view_as_complex(self.filter.to(xf.dtype).contiguous())  # (B, h, w//2+1, C)
        y = torch.fft.irfft2(X, s=(h, w), dim=(1, 2), norm="ortho")  # (B, h, w, C)
        return y.reshape(B, N, C).to(dtype)


def naive_circular_conv(x: Tensor, kernel: Tensor, h: int, w: int) -> Tensor:
    """Reference of :class:`SpectralGating` with the filter ``rfft2(kernel)`` (unnormalized): the circular
    convolution ``y[i, j] = sum_{a, b} kernel[a, b] x[(i - a) % h, (j - b) % w]`` per channel, one roll per
    kernel tap. ``x`` ``[B, h w, C]``, ``kernel`` ``[h, w, C]`` -> ``[B, h w, C]``."""
    B, N, C = x.shape
    grid = x.view(B, h, w, C)
    y = torch.zeros_like(grid)
    for a in range(h):
        for b in range(w):
            y = y + kernel[a, b] * torch.roll(grid, shifts=(a, b), dims=(1, 2))
    return y.reshape(B, N, C)
