"""Attention-aware expert routing for sparse mixtures of experts, from "Improving Routing in Sparse Mixture of
Experts with Graph of Tokens" (Nguyen, Tran, Nguyen and Baraniuk, ICML 2025).

A router, not an attention variant (so not registered): the attention matrix of the layer before the MoE decides
how tokens borrow each other's routing distributions. The mixing ``A @ P`` runs through :func:`headwise.attention`
with the routing probabilities as values, so the ``N x N`` attention matrix is never materialized;
:func:`naive_attention_aware_gates` is the materialized reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.core.attention import BACKENDS, attention
from headwise.patterns import Pattern
from headwise.checks import check_positive_int

__all__ = ["attention_aware_gates", "naive_attention_aware_gates", "AttentionAwareRouter"]


def attention_aware_gates(q: Tensor, k: Tensor, probs: Tensor, pattern: Pattern | None = None, *,
                          backend: str = "auto") -> Tensor:
    r"""Routing distributions mixed along the attention graph: ``\hat p_i = \frac{1}{H}\sum_h \sum_j A^h_{ij} p_j``.

    ``A^h = softmax(q_h k_h^T / sqrt(D))`` (restricted to ``pattern``) is the attention of the preceding layer and
    ``p_j = softmax(W_g x_j)`` the token's own routing distribution: token ``i`` picks a neighbour ``j`` with
    probability ``A_ij`` and takes its expert choice (the paper's graph-of-tokens model), so the mixture is again a
    distribution over experts.

    Shapes: ``q`` ``[B, H, N, D]``, ``k`` ``[B, H_kv, N, D]``, ``probs`` ``[B, N, E]`` -> ``[B, N, E]``.
    """
    if probs.dim() != 3 or probs.shape[:2] != (q.shape[0], k.shape[2]):
        raise ValueError(f"probs must be [B, N, E] with B, N = {[q.shape[0], k.shape[2]]}, got probs.shape={tuple(probs.shape)}")
    v = probs[:, None].expand(-1, k.shape[1], -1, -1)  # (B, H_kv, N, E): every head carries the same values
    mixed = attention(q, k, v, pattern, backend=backend)  # (B, H, N, E) = A^h @ P
    return mixed.mean(1)  # (B, N, E)


def naive_attention_aware_gates(q: Tensor, k: Tensor, probs: Tensor) -> Tensor:
    """Reference for :func:`attention_aware_gates` (full attention): the materialized, head-averaged ``A`` times ``P``."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, N, D)
    a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, N)
    return a.mean(1) @ probs  # (B, N, E)


class AttentionAwareRouter(nn.Module):
    r"""Attention-Aware SMoE routing (Nguyen et al., ICML 2025): top-``k`` experts chosen from
    :func:`attention_aware_gates`, i.e. from the routing distributions of the tokens each token attends to.

    .. math::

        p_j = \mathrm{softmax}(W_g x_j),\qquad \hat p_i = \tfrac{1}{H}\textstyle\sum_h \sum_j A^h_{ij} p_j,\qquad
        \mathcal{E}_i = \mathrm{TopK}(\hat p_i, k),\quad g_{ie} = \hat p_{ie} / \textstyle\sum_{e' \in \mathcal{E}_i} \hat p_{ie'}

    ``q, k`` are the queries and keys of the attention layer that precedes the MoE layer (e.g. from
    :meth:`MultiHeadAttention.project`). Returns ``(gates, experts, probs)``: ``gates`` ``[B, N, k]`` (renormalized to
    sum to 1), ``experts`` ``[B, N, k]`` indices, ``probs`` ``[B, N, E]`` the mixed distribution (for a
    load-balancing loss).

    Args:
        dim: token width ``C``.
        experts: number of experts ``E``.
        top_k: experts per token ``k`` (default 2).
        backend: :func:`headwise.attention` backend.

    Choices made here: mixing the routing *probabilities* (not the logits) with the attention matrix is our
    reading of the paper's graph-of-tokens model from its abstract and derivation outline; the exact equations
    were not available to check in this implementation. The attention is averaged over heads, and the gates
    are renormalized over the selected experts, as in softmax top-k SMoE.
    """

    @dataclass
    class Config:
        dim: int  # token width C
        experts: int  # number of experts E
        top_k: int = 2  # experts per token, 1..experts
        backend: str = "auto"  # headwise.attention backend for the mixing

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("experts", self.experts)
            check_positive_int("top_k", self.top_k)
            if self.top_k > self.experts:
                raise ValueError(f"top_k must be at most experts={self.experts}, got top_k={self.top_k}")
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"unknown backend={self.backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))

    def __init__(self, dim: int, experts: int, *, top_k: int = 2, backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, experts=experts, top_k=top_k, backend=backend)
        self.gate = nn.Linear(dim, cfg.experts, bias=False)  # W_g

    def forward(self, x: Tensor, q: Tensor, k: Tensor, pattern: Pattern | None = None) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"x must be [B, N, C] with C = dim = {self.config.dim}, got x.shape={tuple(x.shape)}")
        probs = torch.softmax(self.gate(x), dim=-1)  # (B, N, E)
        mixed = attention_aware_gates(q, k, probs, pattern, backend=self.config.backend)  # (B, N, E)
        top, experts = mixed.topk(self.config.top_k, dim=-1)  # (B, N, k)
        return top / top.sum(-1, keepdim=True), experts, mixed

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, experts={c.experts}, top_k={c.top_k}"
