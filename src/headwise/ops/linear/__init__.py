"""Linear-complexity attention with decay, functional ops on ``[B, H, N, D]`` (flash-linear-attention's layout).

Causal linear attention with per-head decay (TransNormerLLM / Lightning Attention), three implementations of the
same maths, named by how they compute:

* :func:`naive_linear_attention` (``naive.py``): the quadratic form ``((Q K^T) * M) V``, the ground truth;
* :func:`recurrent_linear_attention` (``recurrent.py``): token by token through the state, the decoding path;
* :func:`chunk_linear_attention` (``chunk.py``): Lightning Attention-2 tiling, the fast path (forward and backward).

All three take ``(q, k, v, decay, *, scale, normalize, initial_state, output_final_state)`` and return
``(o, final_state or None)``. :func:`decay_rates` gives the papers' per-head decays (``base.py``, with the
argument checks and the normalizer the three share). The modules are ``lightning`` and ``linear``
(:mod:`headwise.variants.lightning`, :mod:`headwise.variants.linear`). Also reachable as ``headwise.linear``.
"""

from headwise.ops.linear.base import alibi_slopes, decay_rates
from headwise.ops.linear.chunk import chunk_linear_attention
from headwise.ops.linear.naive import naive_linear_attention
from headwise.ops.linear.recurrent import recurrent_linear_attention

__all__ = [
    "naive_linear_attention",
    "recurrent_linear_attention",
    "chunk_linear_attention",
    "decay_rates",
    "alibi_slopes",
]
