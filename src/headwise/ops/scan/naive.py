"""Reference of the selective scan: the recurrence, one time step at a time (also ``multihead_scan``'s default
path, which is faster than the chunked form at its sizes on CPU)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["recurrent_selective_scan"]


def recurrent_selective_scan(x: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor) -> Tensor:
    r"""Mamba's selective scan (S6), one step at a time (the reference).

    ``h_t = exp(delta_t A) * h_{t-1} + (delta_t x_t) B_t``, ``y_t = h_t C_t + D x_t`` per channel, with
    ``x, delta`` ``[B, K, L, d]``, ``A`` ``[K, d, n]`` (negative), ``Bm, Cm`` ``[B, K, L, n]``, ``D`` ``[K, d]``
    for ``K`` independent sequences; returns ``y`` ``[B, K, L, d]``.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 3, 5, 4)                                    # [B, K, L, d]
        >>> y = recurrent_selective_scan(x, torch.rand(2, 3, 5, 4), -torch.rand(3, 4, 6), torch.randn(2, 3, 5, 6),
        ...                              torch.randn(2, 3, 5, 6), torch.ones(3, 4))
        >>> y.shape
        torch.Size([2, 3, 5, 4])
    """
    Bsz, K, L, d = x.shape
    h = x.new_zeros(Bsz, K, d, A.shape[-1])  # (B, K, d, n)
    ys = []
    for t in range(L):
        decay = torch.exp(delta[:, :, t, :, None] * A)  # (B, K, d, n)
        h = decay * h + (delta[:, :, t] * x[:, :, t])[..., None] * Bm[:, :, t, None, :]  # (B, K, d, n)
        ys.append((h * Cm[:, :, t, None, :]).sum(-1))  # (B, K, d)
    return torch.stack(ys, dim=2) + D[:, None] * x  # (B, K, L, d)
