"""Attention-aware gates against the materialized, head-averaged attention matrix."""

import pytest
import torch

from headwise.ops.routing import attention_aware_gates, naive_attention_aware_gates
from headwise.patterns import Causal
from common import F64, assert_same_forward_and_grads, rand


@pytest.mark.parametrize("H,H_kv,N,E", [(1, 1, 1, 2), (4, 2, 63, 8), (2, 2, 100, 3)], ids=lambda v: str(v))
def test_attention_aware_gates_match_materialized(H, H_kv, N, E):
    q, k = rand(2, H, N, 8, requires_grad=True), rand(2, H_kv, N, 8, seed=1, requires_grad=True)
    probs = torch.softmax(rand(2, N, E, seed=2), -1).requires_grad_()
    out = attention_aware_gates(q, k, probs)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, N, dtype=F64))  # still a distribution
    assert_same_forward_and_grads(out, naive_attention_aware_gates(q, k, probs), (q, k, probs), seed=3)


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
