"""Attention-aware gates as one :func:`headwise.attention` call with the routing probabilities as values."""

from __future__ import annotations

from torch import Tensor

from headwise.core.attention import attention
from headwise.patterns import Pattern

__all__ = ["attention_aware_gates"]


def attention_aware_gates(q: Tensor, k: Tensor, probs: Tensor, pattern: Pattern | None = None, *,
                          backend: str = "auto") -> Tensor:
    r"""Routing distributions mixed along the attention graph: ``\hat p_i = \frac{1}{H}\sum_h \sum_j A^h_{ij} p_j``.

    ``A^h = softmax(q_h k_h^T / sqrt(D))`` (restricted to ``pattern``) is the attention of the preceding layer and
    ``p_j = softmax(W_g x_j)`` the token's own routing distribution: token ``i`` picks a neighbour ``j`` with
    probability ``A_ij`` and takes its expert choice (the paper's graph-of-tokens model), so the mixture is again a
    distribution over experts. The ``N x N`` attention matrix is never materialized (the probabilities are the
    values of one attention call).

    Shapes: ``q`` ``[B, H, N, D]``, ``k`` ``[B, H_kv, N, D]``, ``probs`` ``[B, N, E]`` -> ``[B, N, E]``.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        >>> probs = torch.softmax(torch.randn(1, 5, 3), -1)        # 5 tokens, 3 experts
        >>> mixed = attention_aware_gates(q, k, probs)
        >>> mixed.shape, bool(torch.allclose(mixed.sum(-1), torch.ones(1, 5)))
        (torch.Size([1, 5, 3]), True)
    """
    if probs.dim() != 3 or probs.shape[:2] != (q.shape[0], k.shape[2]):
        raise ValueError(f"probs must be [B, N, E] with B, N = {[q.shape[0], k.shape[2]]}, got probs.shape={tuple(probs.shape)}")
    v = probs[:, None].expand(-1, k.shape[1], -1, -1)  # (B, H_kv, N, E): every head carries the same values
    mixed = attention(q, k, v, pattern, backend=backend)  # (B, H, N, E) = A^h @ P
    return mixed.mean(1)  # (B, N, E)
