"""Attention-aware expert routing (Nguyen et al., ICML 2025): routing distributions mixed along the attention graph
of the preceding layer (fast path through :func:`headwise.attention`, materialized reference)."""

from headwise.ops.routing.naive import naive_attention_aware_gates
from headwise.ops.routing.routing import attention_aware_gates

__all__ = ["attention_aware_gates", "naive_attention_aware_gates"]
