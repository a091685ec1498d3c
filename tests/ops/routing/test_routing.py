"""Attention-aware gates against the materialized, head-averaged attention matrix."""

import pytest
import torch

from headwise.ops.routing import attention_aware_gates, naive_attention_aware_gates
from headwise.patterns import Causal

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("H,H_kv,N,E", [(1, 1, 1, 2), (4, 2, 63, 8), (2, 2, 100, 3)], ids=lambda v: str(v))
def test_attention_aware_gates_match_materialized(H, H_kv, N, E):
    q, k = rand(2, H, N, 8).requires_grad_(), rand(2, H_kv, N, 8, seed=1).requires_grad_()
    probs = torch.softmax(rand(2, N, E, seed=2), -1).requires_grad_()
    out = attention_aware_gates(q, k, probs)
    ref = naive_attention_aware_gates(q, k, probs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, N, dtype=F64))  # still a distribution
    g = rand(*out.shape, seed=3)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, probs)),
                    torch.autograd.grad((ref * g).sum(), (q, k, probs))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_causal_pattern_mixes_only_past_tokens():
    q, k = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=1)
    probs = torch.eye(5, dtype=F64)[None]  # token j routes to expert j: the output is the attention itself
    a = attention_aware_gates(q, k, probs, Causal())
    assert torch.all(a.triu(1) == 0)
    torch.testing.assert_close(a[0, 0], torch.eye(5, dtype=F64)[0])


def test_bad_probs_raise():
    q, k = rand(2, 2, 9, 4), rand(2, 2, 9, 4, seed=1)
    with pytest.raises(ValueError, match=r"probs must be \[B, N, E\]"):
        attention_aware_gates(q, k, torch.rand(2, 8, 4))
