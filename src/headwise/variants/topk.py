"""Top-k attention (registered as ``"topk"``).

The simple content-aware baseline of the dynamic-sparsity family: multi-head attention in which each query keeps
only its ``topk`` highest-scoring keys. The functional core is :mod:`headwise.ops.topk` (chunked
:func:`~headwise.ops.topk.topk_attention` on :func:`~headwise.ops.topk.keep_attention`, recomputed in the
backward; the reference :func:`~headwise.ops.topk.naive_topk_attention` in ``naive.py``); this module owns the
projections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor

from headwise.checks import check_bool, check_positive_int
from headwise.ops.topk import topk_attention
from headwise.variants.base import Capabilities, ProjectedAttention
from headwise.variants.registry import register

__all__ = ["TopKAttention"]


@register("topk")
class TopKAttention(ProjectedAttention):
    r"""Top-k attention (the simple content-aware baseline): multi-head attention in which each query keeps only
    its ``topk`` highest-scoring keys (:func:`headwise.ops.topk.topk_attention`):

    .. math::

        o_i = \sum_{j \in T_i} \mathrm{softmax}_{j \in T_i}(q_i \cdot k_j / \sqrt{D})\, v_j,\qquad
        T_i = \mathrm{top}_k\{ q_i \cdot k_j : j \text{ allowed} \}

    (allowed: ``j <= i`` when ``causal``). Shapes: ``x`` ``[B, N, C]``, ``context`` ``[B, M, C]`` (non-causal
    only) -> ``[B, N, C]``; heads ``[B, H, N, D]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as
            :class:`~headwise.variants.base.ProjectedAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        topk: keys kept per query (default 64); ``topk >= M`` is full attention.
        causal: only keys ``j <= i`` are candidates (default False); a causal module attends to ``x`` itself.

    Choices made here: the scores are computed densely (chunk by chunk of queries) and ties go to the lower key
    index; there is no approximate search. The selection is not differentiated.

    Example:
        >>> import torch, headwise
        >>> headwise.create("topk(topk=8, causal=True)", dim=64, heads=4)(torch.randn(2, 50, 64)).shape
        torch.Size([2, 50, 64])
    """

    capabilities = Capabilities(causal="optional", context=True, weights="method")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "topk": 3}

    @dataclass
    class Config(ProjectedAttention.Config):
        topk: int = 64  # keys kept per query
        causal: bool = False  # restrict the candidates of query i to keys j <= i

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("topk", self.topk)
            check_bool("causal", self.causal)

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """Cross-attention (``context``) only when not causal: causal top-k needs as many keys as queries."""
        return dataclasses.replace(cls.capabilities, context=False) if config.causal else cls.capabilities

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.topk.topk_attention` with this module's settings."""
        return topk_attention(q, k, v, self.config.topk, causal=self.config.causal)  # (B, H, N, D)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attend from ``x`` ``[B, N, C]`` to ``context`` ``[B, M, C]`` (``x`` itself when None) -> ``[B, N, C]``."""
        return self.finish(self.attend(*self.project(x, context)))
