"""Dynamic Mask Attention: attention over the ``w`` keys of highest per-key bias, the bias added to the scores
(fast path and reference)."""

from headwise.ops.dma.dma import dma_attention
from headwise.ops.dma.naive import naive_dma_attention

__all__ = ["dma_attention", "naive_dma_attention"]
