"""The reference of Agent Attention: both softmax matrices materialized. O(N n) memory."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_agent_attention"]


def naive_agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    r"""``sigma(s Q A^T + B_2) sigma(s A K^T + B_1) V``, written out: the readable reference of
    :func:`headwise.ops.agent.agent_attention` (same arguments, no backend, no checks).

    ``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]``, ``v`` ``[B, H, M, Dv]``, ``agents`` ``[B, H, n, D]``;
    ``agent_bias`` ``B_1`` broadcasting to ``[B, H, n, M]``, ``query_bias`` ``B_2`` to ``[B, H, N, n]``;
    ``scale`` ``s``, default ``D ** -0.5``. Returns ``[B, H, N, Dv]``.
    """
    s = q.shape[-1] ** -0.5 if scale is None else scale
    p_agents = torch.softmax(s * agents @ k.transpose(-1, -2) + (0 if agent_bias is None else agent_bias), -1)  # (B, H, n, M)
    p_queries = torch.softmax(s * q @ agents.transpose(-1, -2) + (0 if query_bias is None else query_bias), -1)  # (B, H, N, n)
    return p_queries @ (p_agents @ v)  # (B, H, N, Dv)
