"""Agent Attention's two softmax steps (agent aggregation, agent broadcast), through :func:`headwise.attention`: the
fast path (the reference is :func:`headwise.ops.agent.naive_agent_attention`)."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.attention import attention
from headwise.core.checks import check_qkv, default_scale

__all__ = ["agent_attention"]


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Agent Attention (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

    ``n`` agent tokens ``A`` first aggregate the keys and values, then broadcast the result back to the queries:

    .. math::

        V_A = \sigma(s\,A K^\top + B_1)\, V, \qquad O = \sigma(s\,Q A^\top + B_2)\, V_A

    with ``sigma`` the row softmax: a generalized linear attention with feature maps
    ``phi_q(Q) = sigma(s Q A^T + B_2)`` and ``phi_k(K)^T = sigma(s A K^T + B_1)``, O(N n) time and memory. (The
    module :class:`headwise.variants.agent.AgentAttention` adds the pooling of agents from the queries and the
    depthwise-convolution term.)

    Args:
        q: ``[B, H, N, D]`` queries. k: ``[B, H, M, D]`` keys. v: ``[B, H, M, Dv]`` values.
        agents: ``[B, H, n, D]`` agent tokens.
        agent_bias: ``B_1``, additive bias on the agent-to-key scores, ``[H, n, M]`` or ``[B, H, n, M]``.
        query_bias: ``B_2``, additive bias on the query-to-agent scores, ``[H, N, n]`` or ``[B, H, N, n]``.
        scale: ``s``, default ``D ** -0.5``.
        backend: the :func:`headwise.attention` backend of both softmax steps (``"reference"`` for float64 checks).

    Returns:
        ``[B, H, N, Dv]``.

    A bias is folded into the dot product (exact, no approximation): the agents get a one-hot code and the other
    side the bias entries, ``[s a, e_a] . [k_j, B_1[a, j]] = s a . k_j + B_1[a, j]``, so both steps stay plain
    softmax attention calls at the cost of ``n`` extra head dimensions.

    Example:
        >>> import torch
        >>> from headwise.ops.agent import agent_attention
        >>> q = k = v = torch.randn(2, 8, 3136, 64)                         # [B, H, N, D], a 56 x 56 grid
        >>> agents = torch.nn.functional.adaptive_avg_pool1d(q.flatten(0, 1).transpose(1, 2), 49)
        >>> out = agent_attention(q, k, v, agents.transpose(1, 2).reshape(2, 8, 49, 64))   # [2, 8, 3136, 64]
    """
    check_qkv(q, k, v, None, scale)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"agent attention needs as many key/value heads as query heads, got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")
    if not isinstance(agents, Tensor):
        raise TypeError(f"agents must be a torch.Tensor [B, H, n, D], got {type(agents).__name__}")
    B, H, N, D = q.shape
    M = k.shape[2]
    if agents.dim() != 4 or agents.shape[:2] != q.shape[:2] or agents.shape[-1] != D or agents.shape[2] < 1:
        raise ValueError(f"agents must be [B, H, n, D] = [{B}, {H}, n, {D}], got agents.shape={tuple(agents.shape)}")
    if agents.dtype != q.dtype or agents.device != q.device:
        raise ValueError(f"agents must match q's dtype and device, got {agents.dtype=} on {agents.device}, "
                         f"{q.dtype=} on {q.device}")
    n = agents.shape[2]
    s = default_scale(q, scale)
    agent_v = _biased_attention(agents, k, v, _check_bias("agent_bias", agent_bias, B, H, n, M, q), s, backend)  # (B, H, n, Dv)
    return _biased_attention(q, agents, agent_v, _check_bias("query_bias", query_bias, B, H, N, n, q), s, backend)  # (B, H, N, Dv)


def _check_bias(name: str, bias: Tensor | None, B: int, H: int, rows: int, cols: int, like: Tensor) -> Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dim() == 3:
        bias = bias[None]
    if bias.dim() != 4 or bias.shape[0] not in (1, B) or tuple(bias.shape[1:]) != (H, rows, cols):
        raise ValueError(f"{name} must be [H, {rows}, {cols}] or [B, H, {rows}, {cols}] with {B=}, {H=}, got "
                         f"{name}.shape={tuple(bias.shape)}")
    if bias.dtype != like.dtype or bias.device != like.device:
        raise ValueError(f"{name} must match q's dtype and device, got {bias.dtype} on {bias.device}")
    return bias.expand(B, H, rows, cols)


def _biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, backend: str) -> Tensor:
    """``softmax(scale q k^T + bias) v`` as one :func:`headwise.attention` call (bias ``[B, H, Nq, Nk]``)."""
    if bias is None:
        return attention(q, k, v, scale=scale, backend=backend)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    # the shorter side gets a one-hot code and the other side the matching bias entries: min(Nq, Nk) extra dims
    if Nk <= Nq:
        one_hot = torch.eye(Nk, dtype=q.dtype, device=q.device).expand(B, H, Nk, Nk)
        q_aug = torch.cat([q * scale, bias], dim=-1)  # (B, H, Nq, D + Nk): [s q_i, B[i, :]]
        k_aug = torch.cat([k, one_hot], dim=-1)  # (B, H, Nk, D + Nk): [k_j, e_j]
    else:
        one_hot = torch.eye(Nq, dtype=q.dtype, device=q.device).expand(B, H, Nq, Nq)
        q_aug = torch.cat([q * scale, one_hot], dim=-1)  # (B, H, Nq, D + Nq): [s q_i, e_i]
        k_aug = torch.cat([k, bias.transpose(-1, -2)], dim=-1)  # (B, H, Nk, D + Nq): [k_j, B[:, j]]
    return attention(q_aug, k_aug, v, scale=1.0, backend=backend)
