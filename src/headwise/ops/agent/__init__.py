"""Agent Attention's functional core: agent aggregation then agent broadcast, two softmax steps.

:func:`agent_attention` (``agent.py``, the fast path: both steps through :func:`headwise.attention`, the agent
biases folded into the dot products) and :func:`naive_agent_attention` (``naive.py``, the reference: both softmax
matrices materialized). The module is ``agent`` (:mod:`headwise.variants.agent`).
"""

from headwise.ops.agent.agent import agent_attention
from headwise.ops.agent.naive import naive_agent_attention

__all__ = ["agent_attention", "naive_agent_attention"]
