"""HiP: attention over the key blocks a hierarchical tree search finds per query block (fast path and reference)."""

from headwise.ops.hip.hip import hip_attention
from headwise.ops.hip.naive import hip_mask, naive_hip_attention

__all__ = ["hip_attention", "naive_hip_attention", "hip_mask"]
