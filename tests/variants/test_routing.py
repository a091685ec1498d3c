"""AttentionAwareRouter (Attention-Aware SMoE routing, not a registered variant): gating, gradients, config."""

import pytest
import torch

from headwise.variants.mha import MultiHeadAttention
from headwise.variants.routing import AttentionAwareRouter
from common import F64, rand


def test_router_with_identity_attention_is_plain_top_k_softmax_gating():
    """Keys that make every token attend only to itself: the router reduces to softmax top-k gating."""
    torch.manual_seed(0)
    r = AttentionAwareRouter(6, 5, topk=2).double()
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
    with pytest.raises(ValueError, match="topk must be at most experts=4, got topk=5"):
        AttentionAwareRouter(8, 4, topk=5)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\] with C = dim = 8"):
        r(torch.randn(2, 9, 7), q, k)


def test_old_top_k_keyword_still_works_and_warns():
    with pytest.warns(FutureWarning, match="top_k= is renamed topk="):
        r = AttentionAwareRouter(8, 4, top_k=3)
    assert r.config.topk == 3
    with pytest.raises(ValueError, match="give only the new"):
        AttentionAwareRouter(8, 4, top_k=3, topk=3)


def test_example_runs():
    torch.manual_seed(0)
    r = AttentionAwareRouter.example_module().double()
    gates, experts, mixed = r(*r.example())
    assert gates.shape == (2, 7, 2) and experts.shape == (2, 7, 2) and mixed.shape == (2, 7, 4)
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 7, dtype=F64))
