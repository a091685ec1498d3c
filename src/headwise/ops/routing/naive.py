"""Reference of attention-aware gates: the head-averaged attention matrix materialized, times the probabilities."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_attention_aware_gates"]


def naive_attention_aware_gates(q: Tensor, k: Tensor, probs: Tensor) -> Tensor:
    """Reference for :func:`~headwise.ops.routing.attention_aware_gates` (full attention): the materialized,
    head-averaged ``A`` times ``P``. Shapes as there."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, N, D)
    a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    return a.mean(1) @ probs  # (B, N, E)
