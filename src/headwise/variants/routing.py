"""Attention-aware expert routing for sparse mixtures of experts, from "Improving Routing in Sparse Mixture of
Experts with Graph of Tokens" (Nguyen, Tran, Nguyen and Baraniuk, ICML 2025). Registers nothing.

A router, not an attention variant (so not registered, though built on :class:`~headwise.variants.base.Variant`
for its config, constructor and renamed keywords): the attention matrix of the layer before the MoE decides how
tokens borrow each other's routing distributions. The functional core is :mod:`headwise.ops.routing`
(:func:`~headwise.ops.routing.attention_aware_gates` mixes the probabilities through :func:`headwise.attention`,
so the ``N x N`` attention matrix is never materialized; the materialized reference is in ``naive.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.checks import check_positive_int, check_tokens
from headwise.ops.routing import attention_aware_gates
from headwise.patterns import Pattern
from headwise.variants.base import Capabilities, Variant, check_backend

__all__ = ["AttentionAwareRouter"]


class AttentionAwareRouter(Variant):
    r"""Attention-Aware SMoE routing (Nguyen et al., ICML 2025): top-``k`` experts chosen from
    :func:`~headwise.ops.routing.attention_aware_gates`, i.e. from the routing distributions of the tokens each
    token attends to.

    .. math::

        p_j = \mathrm{softmax}(W_g x_j),\qquad \hat p_i = \tfrac{1}{H}\textstyle\sum_h \sum_j A^h_{ij} p_j,\qquad
        \mathcal{E}_i = \mathrm{TopK}(\hat p_i, k),\quad g_{ie} = \hat p_{ie} / \textstyle\sum_{e' \in \mathcal{E}_i} \hat p_{ie'}

    ``q, k`` are the queries and keys of the attention layer that precedes the MoE layer (e.g. from
    :meth:`MultiHeadAttention.project`). Returns ``(gates, experts, probs)``: ``gates`` ``[B, N, k]`` (renormalized
    to sum to 1), ``experts`` ``[B, N, k]`` indices, ``probs`` ``[B, N, E]`` the mixed distribution (for a
    load-balancing loss).

    Args (the fields of :class:`AttentionAwareRouter.Config`):
        dim: token width ``C``.
        experts: number of experts ``E``.
        topk: experts per token ``k`` (default 2; formerly ``top_k``, still accepted with a ``FutureWarning``).
        backend: :func:`headwise.attention` backend.

    Choices made here: mixing the routing *probabilities* (not the logits) with the attention matrix is our
    reading of the paper's graph-of-tokens model from its abstract and derivation outline; the exact equations
    were not available to check in this implementation. The attention is averaged over heads, and the gates
    are renormalized over the selected experts, as in softmax top-k SMoE.

    Example:
        >>> import torch, headwise
        >>> mha = headwise.create("mha", dim=32, heads=4)
        >>> router = AttentionAwareRouter(32, experts=8, topk=2)
        >>> x = torch.randn(2, 10, 32)
        >>> q, k, _ = mha.project(x)
        >>> gates, experts, probs = router(x, q, k)
        >>> gates.shape, experts.shape, probs.shape
        (torch.Size([2, 10, 2]), torch.Size([2, 10, 2]), torch.Size([2, 10, 8]))
    """

    capabilities = Capabilities(inputs=("q", "k"), output="tuple")
    aliases = {"top_k": "topk"}
    example_config = {"dim": 8, "experts": 4, "topk": 2}

    @dataclass
    class Config:
        dim: int  # token width C
        experts: int  # number of experts E
        topk: int = 2  # experts per token, 1..experts
        backend: str = "auto"  # headwise.attention backend for the mixing

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("experts", self.experts)
            check_positive_int("topk", self.topk)
            if self.topk > self.experts:
                raise ValueError(f"topk must be at most experts={self.experts}, got topk={self.topk}")
            check_backend(self.backend)

    def build(self, cfg) -> None:
        self.gate = nn.Linear(cfg.dim, cfg.experts, bias=False)  # W_g

    def forward(self, x: Tensor, q: Tensor, k: Tensor, pattern: Pattern | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Route ``x`` ``[B, N, C]`` along the attention of ``q`` ``[B, H, N, D]`` and ``k`` ``[B, H_kv, N, D]``
        (restricted to ``pattern``); returns ``(gates, experts, probs)`` (class docstring)."""
        check_tokens("x", x, self.config.dim)
        probs = torch.softmax(self.gate(x), dim=-1)  # (B, N, E)
        mixed = attention_aware_gates(q, k, probs, pattern, backend=self.config.backend)  # (B, N, E)
        top, experts = mixed.topk(self.config.topk, dim=-1)  # (B, N, k)
        return top / top.sum(-1, keepdim=True), experts, mixed

    def example(self, batch: int = 2, *, generator: torch.Generator | None = None) -> tuple:
        """``(x [B, 7, C], q [B, 2, 7, 4], k [B, 2, 7, 4])``: tokens and the preceding layer's queries and keys."""
        x = self.example_randn(batch, 7, self.config.dim, generator=generator)
        q, k = (self.example_randn(batch, 2, 7, 4, generator=generator) for _ in range(2))
        return x, q, k
