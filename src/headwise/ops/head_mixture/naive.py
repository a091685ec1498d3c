"""The reference of the head mixture: every head computed for every token, then weighted and masked."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.attention import attention
from headwise.patterns import Pattern

__all__ = ["dense_head_mixture", "check_mixture"]


def check_mixture(q: Tensor, gates: Tensor, active: Tensor) -> None:
    """``gates`` ``[B, N, H]`` and ``active`` ``[B, N, H]`` bool match the queries ``q`` ``[B, H, N, D]``."""
    B, H, N, _ = q.shape
    if not isinstance(gates, Tensor) or tuple(gates.shape) != (B, N, H):
        raise ValueError(f"gates must be [B, N, H] = {[B, N, H]}, got "
                         f"{tuple(gates.shape) if isinstance(gates, Tensor) else type(gates).__name__}")
    if not isinstance(active, Tensor) or active.dtype != torch.bool or tuple(active.shape) != (B, N, H):
        raise ValueError(f"active must be a bool tensor [B, N, H] = {[B, N, H]}, got "
                         f"{(active.dtype, tuple(active.shape)) if isinstance(active, Tensor) else type(active).__name__}")


def dense_head_mixture(
    q: Tensor, k: Tensor, v: Tensor, gates: Tensor, active: Tensor, pattern: Pattern | None = None,
    *, scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Per-token weighted sum of heads, every head computed for every token (the reference of the gather path).

    ``out[b, n, h] = [active[b, n, h]] * gates[b, n, h] * attention(q, k, v, pattern)[b, h, n]``

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, M, D]`` and ``[B, H_kv, M, Dv]`` (GQA when ``H_kv < H``).
        gates: ``[B, N, H]`` weight of each head for each token.
        active: ``[B, N, H]`` bool, the heads each token uses; inactive pairs get weight 0 (and no gradient
            reaches their gate).
        pattern, scale, backend: as in :func:`headwise.attention`.

    Returns:
        ``[B, N, H, Dv]`` (token-major: ``.reshape(B, N, H * Dv)`` feeds the output projection).

    Also the ``compute="dense"`` path of the MoH modules: one large attention call, the faster choice on a GPU
    at moderate sizes (see :func:`~headwise.ops.head_mixture.gather_head_mixture`).
    """
    check_mixture(q, gates, active)
    o = attention(q, k, v, pattern, scale=scale, backend=backend)  # (B, H, N, Dv)
    w = torch.where(active, gates, torch.zeros((), dtype=gates.dtype, device=gates.device))  # (B, N, H)
    return o.transpose(1, 2) * w[..., None].to(o.dtype)  # (B, N, H, Dv)
