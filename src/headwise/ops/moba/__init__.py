"""MoBA and VMoBA: attention over the key blocks each query selects from the content (fast path and reference)."""

from headwise.ops.moba.moba import moba_attention, vmoba_attention
from headwise.ops.moba.naive import moba_mask, naive_moba_attention, naive_vmoba_attention, vmoba_mask

__all__ = ["moba_attention", "vmoba_attention", "naive_moba_attention", "naive_vmoba_attention", "moba_mask",
           "vmoba_mask"]
