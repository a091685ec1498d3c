"""Top-k and keep-mask attention: each query attends to the keys a per-query selection keeps (fast path and
reference)."""

from headwise.ops.topk.naive import naive_topk_attention, rowwise_attention
from headwise.ops.topk.topk import keep_attention, topk_attention

__all__ = ["keep_attention", "topk_attention", "naive_topk_attention", "rowwise_attention"]
