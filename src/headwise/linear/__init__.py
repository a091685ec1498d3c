"""Linear-complexity attention, functional ops on ``[B, H, N, D]`` (flash-linear-attention's layout).

Causal linear attention with per-head decay (TransNormerLLM / Lightning Attention), three implementations of the
same maths, named by how they compute:

* :func:`naive_linear_attention`: the quadratic form ``((Q K^T) * M) V``, the ground truth;
* :func:`recurrent_linear_attention`: token by token through the state, the decoding path;
* :func:`chunk_linear_attention`: Lightning Attention-2 tiling, the fast path (forward and backward).

All three take ``(q, k, v, decay, *, scale, normalize, initial_state, output_final_state)`` and return
``(o, final_state or None)``. :func:`decay_rates` gives the papers' per-head decays. :func:`agent_attention` is
Agent Attention's softmax-linear hybrid.
"""

from headwise.linear.agent import agent_attention
from headwise.linear.base import alibi_slopes, decay_rates
from headwise.linear.chunk import chunk_linear_attention
from headwise.linear.naive import naive_linear_attention
from headwise.linear.recurrent import recurrent_linear_attention

__all__ = [
    "naive_linear_attention",
    "recurrent_linear_attention",
    "chunk_linear_attention",
    "decay_rates",
    "alibi_slopes",
    "agent_attention",
]
