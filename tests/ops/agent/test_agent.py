"""agent_attention: the two softmax steps, with the agent biases folded into the dot products, against
naive_agent_attention (both softmax matrices materialized)."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.agent import agent_attention, naive_agent_attention
from common import F64, assert_same_forward_and_grads


def inputs(B, H, N, n, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, N, D, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(B, H, N, Dv, generator=g, dtype=F64)
    agents = torch.randn(B, H, n, D, generator=g, dtype=F64)
    return q, k, v, agents, g


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("N,n,batched_bias", [(50, 7, False), (5, 9, True), (33, 33, False)],
                         ids=["fewer-agents", "more-agents-batched-bias", "as-many"])
def test_biases_fold_into_attention(backend, N, n, batched_bias):
    B, H = 2, 3
    q, k, v, agents, g = inputs(B, H, N, n)
    lead = (B, H) if batched_bias else (H,)
    agent_bias = torch.randn(*lead, n, N, generator=g, dtype=F64)
    query_bias = torch.randn(*lead, N, n, generator=g, dtype=F64)
    leaves = [t.requires_grad_() for t in (q, k, v, agents, agent_bias, query_bias)]
    got = agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=0.3, backend=backend)
    want = naive_agent_attention(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=0.3)
    assert_same_forward_and_grads(got, want, leaves, seed=g)  # projected on weights drawn next from g


def test_without_biases_default_scale():
    q, k, v, agents, _ = inputs(1, 2, 40, 5)
    torch.testing.assert_close(agent_attention(q, k, v, agents), naive_agent_attention(q, k, v, agents, scale=8 ** -0.5),
                               rtol=1e-10, atol=1e-10)


def test_agents_equal_to_queries_is_two_rounds_of_softmax_attention():
    """With A = Q: O = P_QQ P_QK V, P_XY = softmax(s X Y^T); with K = Q as well, O = P^2 V (P = P_QQ)."""
    q, _, v, _, _ = inputs(1, 2, 30, 30)
    s = 8 ** -0.5
    p = torch.softmax(s * q @ q.transpose(-1, -2), -1)  # (B, H, N, N)
    torch.testing.assert_close(agent_attention(q, q, v, q), p @ p @ v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(a, agents=a["agents"][:, :1]), r"agents must be \[B, H, n, D\]"),
    (lambda a: dict(a, agents=a["agents"][..., :3]), r"agents must be \[B, H, n, D\]"),
    (lambda a: dict(a, agents=a["agents"].float()), r"agents must match q's dtype"),
    (lambda a: dict(a, agents=[1.0]), r"agents must be a torch.Tensor"),
    (lambda a: dict(a, k=a["k"][:, :1], v=a["v"][:, :1]), r"as many key/value heads"),
    (lambda a: dict(a, agent_bias=torch.zeros(2, 5, 11, dtype=F64)), r"agent_bias must be \[H, 5, 10\]"),
    (lambda a: dict(a, query_bias=torch.zeros(2, 5, 10, dtype=F64)), r"query_bias must be \[H, 10, 5\]"),
    (lambda a: dict(a, scale=-1.0), r"scale must be a positive number"),
], ids=["agent-heads", "agent-dim", "agent-dtype", "agent-type", "gqa", "agent-bias-shape", "query-bias-shape",
        "scale"])
def test_bad_inputs(change, match):
    q, k, v, agents, _ = inputs(1, 2, 10, 5)
    args = change(dict(q=q, k=k, v=v, agents=agents))
    with pytest.raises((ValueError, TypeError), match=match):
        agent_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("agents"), **args)
