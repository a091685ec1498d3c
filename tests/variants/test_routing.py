"""Attention-aware SMoE routing against the materialized attention matrix."""

import pytest
import torch

from headwise.patterns import Causal
from headwise.variants.routing import AttentionAwareRouter, attention_aware_gates, naive_attention_aware_gates
from headwise.variants.mha import MultiHeadAttention

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("H,H_kv,N,E", [(1, 1, 1, 2), (4, 2, 63, 8), (2, 2, 100, 3)], ids=lambda v: str(v))
def test_attention_aware_gates_match_materialized(H, H_kv, N, E):
    q, k = rand(2, H, N, 8), rand(2, H_kv, N, 8, seed=1)
    probs = torch.softmax(rand(2, N, E, seed=2), -1).requires_grad_()
    out = attention_aware_gates(q, k, probs)
    ref = naive_attention_aware_gates(q, k, probs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, N, dtype=F64))  # still a distribution
    g = rand(*out.shape, seed=3)
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), probs)[0],
                               torch.autograd.grad((ref * g).sum(), probs)[0], rtol=1e-10, atol=1e-10)


def test_causal_pattern_mixes_only_past_tokens():
    q, k = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=1)
    probs = torch.eye(5, dtype=F64)[None]  # token j routes to expert j: the output is the attention itself
    a = attention_aware_gates(q, k, probs, Causal())
    assert torch.all(a.triu(1) == 0)
    torch.testing.assert_close(a[0, 0], torch.eye(5, dtype=F64)[0])


def test_router_with_identity_attention_is_plain_top_k_softmax_gating():
    """Keys that make every token attend only to itself: the router reduces to softmax top-k gating."""
    torch.manual_seed(0)
    r = AttentionAwareRouter(6, 5, top_k=2).double()
    x = rand(2, 7, 6)
    q = k = 100.0 * torch.eye(7, dtype=F64).expand(2, 1, 7, 7)  # (B, 1, N, D=N), scores 1e4 on the diagonal
    gates, experts, mixed = r(x, q, k)
    p = torch.softmax(r.gate(x), -1)
    torch.testing.assert_close(mixed, p, rtol=1e-10, atol=1e-10)
    top, idx = p.topk(2, -1)
    assert torch.equal(experts, idx)
    torch.testing.assert_close(gates, top / top.sum(-1, keepdim=True))


def test_router_with_mha_projections_grads_and_errors():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2)
    r = AttentionAwareRouter(8, 4)
    x = torch.randn(2, 9, 8)
    q, k, _ = mha.project(x)
    gates, experts, mixed = r(x, q, k)
    assert gates.shape == experts.shape == (2, 9, 2) and mixed.shape == (2, 9, 4)
    (gates * torch.randn_like(gates)).sum().backward()
    assert r.gate.weight.grad.abs().max() > 0 and mha.q_proj.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="top_k must be at most experts=4, got top_k=5"):
        AttentionAwareRouter(8, 4, top_k=5)
    with pytest.raises(ValueError, match=r"probs must be \[B, N, E\]"):
        attention_aware_gates(q, k, torch.rand(2, 8, 4))
