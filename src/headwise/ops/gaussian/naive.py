"""The reference of GAAM's weights: the product of Gaussian densities, normalised, exactly as written."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["naive_gaussian_weights"]


def naive_gaussian_weights(x: Tensor, mean_offsets: Tensor, scales: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    r"""GAAM weights, literally: a product of Gaussian densities normalised along ``dim`` (the reference).

    With ``mu``, ``sigma^2`` the mean and (biased) variance of ``x`` along ``dim``, per head ``h``:

    .. math::

        w = \frac{\prod_g \mathcal{N}(y_g;\, 0, c_{h,g}^2)}{\sum_{\mathrm{dim}} \prod_g \mathcal{N}(y_g;\, 0, c_{h,g}^2)},
        \qquad y_g = \frac{x - (\mu + \delta_{h,g})}{\sqrt{\sigma^2 + \epsilon}}

    Args:
        x: ``[B, H, N, d]`` features split into heads.
        mean_offsets: ``[H, G]`` learnable offsets ``delta``; scales: ``[H, G]`` learnable spreads ``c``.
        dim: ``-1`` (normalise over each token's features) or ``-2`` (over the tokens of each feature).

    Returns:
        ``[B, H, N, d]`` weights summing to 1 along ``dim``. The product underflows when the densities are small
        (many Gaussians, narrow spreads, low precision): use :func:`~headwise.ops.gaussian.gaussian_weights`.
        The authors' code clamps the normaliser at ``eps``, which stops the weights summing to 1 once the
        densities are that small; we normalise exactly.
    """
    mu = x.mean(dim, keepdim=True)  # (B, H, N or 1, d or 1)
    sd = torch.sqrt(x.var(dim, unbiased=False, keepdim=True) + eps)
    density = torch.ones_like(x)
    for g in range(mean_offsets.shape[1]):
        delta = mean_offsets[:, g].view(1, -1, 1, 1)  # (1, H, 1, 1)
        c = scales[:, g].view(1, -1, 1, 1)
        y = (x - (mu + delta)) / sd  # (B, H, N, d)
        density = density * torch.exp(-(y**2) / (2 * c**2)) / torch.sqrt(2 * math.pi * c**2)
    return density / density.sum(dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
