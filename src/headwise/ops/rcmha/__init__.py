"""RCMHA's relative attention on heads (Transformer-XL's four score terms, clipped relative distances): the
chunked fused-SDPA path and the materialized reference."""

from headwise.ops.rcmha.chunk import chunk_rcmha_attention
from headwise.ops.rcmha.naive import naive_rcmha_attention, relative_index

__all__ = ["chunk_rcmha_attention", "naive_rcmha_attention", "relative_index"]
