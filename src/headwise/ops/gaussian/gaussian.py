"""GAAM's weights in closed form (one Gaussian and a softmax) and the paper's Importance Factor."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gaussian_weights", "importance_factor"]


def gaussian_weights(x: Tensor, mean_offsets: Tensor, scales: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    r"""The weights of :func:`~headwise.ops.gaussian.naive_gaussian_weights`, computed as one Gaussian and a
    softmax.

    A product of Gaussians in ``u = x - mu`` is one Gaussian (the paper's ``sigma_prod``, ``mu_prod``) with
    precision ``A = sum_g 1 / c_g^2`` and mean ``m = (sum_g delta_g / c_g^2) / A``; every other factor is constant
    along ``dim`` and cancels in the normalisation, so ``w = softmax_dim(-A (u - m)^2 / (2 (sigma^2 + eps)))``:
    ``O(1)`` work per element for any number of Gaussians, and no underflow.

    Shapes: ``x`` ``[B, H, N, d]``, ``mean_offsets`` and ``scales`` ``[H, G]`` -> ``[B, H, N, d]``, summing to 1
    along ``dim`` (``-1``: each token's features; ``-2``: the tokens of each feature).

    Example:
        >>> import torch
        >>> w = gaussian_weights(torch.randn(2, 3, 5, 4), torch.zeros(3, 2), torch.ones(3, 2), dim=-1)
        >>> w.shape, bool(torch.allclose(w.sum(-1), torch.ones(2, 3, 5)))
        (torch.Size([2, 3, 5, 4]), True)
    """
    precision = (1 / scales**2).sum(1).view(1, -1, 1, 1)  # (1, H, 1, 1)  A
    centre = ((mean_offsets / scales**2).sum(1) / (1 / scales**2).sum(1)).view(1, -1, 1, 1)  # (1, H, 1, 1)  m
    mu = x.mean(dim, keepdim=True)  # (B, H, N or 1, d or 1)
    var = x.var(dim, unbiased=False, keepdim=True) + eps
    logits = -precision * (x - mu - centre) ** 2 / (2 * var)  # (B, H, N, d)
    return torch.softmax(logits, dim=dim)


def importance_factor(density: Tensor) -> Tensor:
    r"""The paper's Importance Factor: min-max normalised density attention weights,
    ``IF = (DA - min DA) / (max DA - min DA)`` over all entries of ``density`` (zeros where all are equal).

    The paper averages the weights over a validation set before normalising; the modules of
    :mod:`headwise.variants.gaam` store the mean over the batch of their last forward (``module.density``) and
    its IF (``module.importance_factor``).
    """
    lo, hi = density.min(), density.max()
    span = hi - lo
    return (density - lo) / span if bool(span > 0) else torch.zeros_like(density)
