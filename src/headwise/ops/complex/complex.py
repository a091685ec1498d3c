"""CMHA as plain dot-product attention on rotated queries and keys (:func:`complex_attention`)."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.attention import attention
from headwise.patterns import Pattern

__all__ = ["polar", "complex_rotate", "complex_attention"]


def polar(x: Tensor) -> tuple[Tensor, Tensor]:
    """Euler transform of a real ``[..., D]`` vector into ``D/2`` complex numbers ``z_j = x_j + i x_{j + D/2}``
    in polar form: ``(r, theta)`` ``[..., D/2]`` each, ``z = r e^{i theta}``. Gradients stay finite at ``z = 0``.

    Example:
        >>> import torch
        >>> r, theta = polar(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))   # z = (0, 1 + i)
        >>> r, theta
        (tensor([[0.0000, 1.4142]]), tensor([[0.0000, 0.7854]]))
    """
    a, b = x.chunk(2, dim=-1)  # (..., D/2) real and imaginary parts
    r2 = a * a + b * b
    zero = r2 == 0
    r = torch.sqrt(torch.where(zero, torch.ones_like(r2), r2)).masked_fill(zero, 0.0)
    theta = torch.atan2(b, torch.where(zero, torch.ones_like(a), a))  # 0 at z = 0, finite gradient
    return r, theta


def complex_rotate(x: Tensor, phase_scale: Tensor, phase_shift: Tensor, freq: Tensor, positions: Tensor) -> Tensor:
    """Map ``x`` ``[B, H, N, D]`` to the real vector ``[r cos(phi), r sin(phi)]`` with
    ``phi = phase_scale * theta + phase_shift + freq * position`` (per head and complex component).

    ``phase_scale``, ``phase_shift``, ``freq``: ``[H, D/2]``; ``positions``: ``[N]``. The dot product of two
    such vectors is ``sum_j r r' cos(phi - phi')``, CMHA's score, so the attention runs on plain dot products.
    """
    r, theta = polar(x)  # (B, H, N, D/2) each
    phi = phase_scale[:, None] * theta + phase_shift[:, None] + freq[:, None] * positions[:, None].to(x.dtype)
    return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], dim=-1)  # (B, H, N, D)


def complex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phase_scale: Tensor,
    phase_shift: Tensor,
    freq: Tensor,
    pattern: Pattern | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""CMHA attention (:func:`~headwise.ops.complex.naive_complex_attention`) as :func:`headwise.attention` on
    rotated queries and keys.

    ``Adapt_h(a) = phase_scale * a + phase_shift`` is affine, so the score's angle
    ``Adapt(theta^q_m - theta^k_n) + freq (m - n)`` splits into a query phase
    ``phase_scale theta^q_m + phase_shift + freq m`` minus a key phase ``phase_scale theta^k_n + freq n``
    (:func:`complex_rotate`); the score is the dot product of the rotated vectors. Queries sit at positions
    ``0..N-1``, keys at ``0..M-1``.

    Shapes: ``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]``, ``v`` ``[B, H, M, Dv]`` (one key head per query head:
    the key rotation is per query head), ``phase_scale``, ``phase_shift``, ``freq`` ``[H, D/2]`` ->
    ``[B, H, N, Dv]``. ``pattern``, ``scale`` (default ``D ** -0.5``) and ``backend`` as in
    :func:`headwise.attention`.
    """
    N, M = q.shape[2], k.shape[2]
    zero = torch.zeros_like(phase_shift)  # the key phase has no shift
    q = complex_rotate(q, phase_scale, phase_shift, freq, torch.arange(N, device=q.device))  # (B, H, N, D)
    k = complex_rotate(k, phase_scale, zero, freq, torch.arange(M, device=k.device))  # (B, H, M, D)
    return attention(q, k, v, pattern, scale=scale, backend=backend)  # (B, H, N, Dv)
