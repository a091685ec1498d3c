"""The functional core: ``attention(q, k, v, pattern, backend)`` and its backends."""

from headwise.core.attention import BACKENDS, attention, choose_backend
from headwise.core.merge import merge_attention
from headwise.core.reference import naive_attention

__all__ = ["attention", "choose_backend", "BACKENDS", "merge_attention", "naive_attention"]
