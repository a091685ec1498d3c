"""Mamba's selective scan (S6): the chunked fast path and the step-by-step reference.

``x, delta`` ``[B, K, L, d]``, ``A`` ``[K, d, n]``, ``Bm, Cm`` ``[B, K, L, n]``, ``D`` ``[K, d]`` for ``K``
independent sequences of ``L`` steps -> ``y`` ``[B, K, L, d]``. Used by ``multihead_scan``.
"""

from headwise.ops.scan.chunk import chunk_selective_scan
from headwise.ops.scan.naive import recurrent_selective_scan

__all__ = ["chunk_selective_scan", "recurrent_selective_scan"]
