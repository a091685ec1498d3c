"""The reference itself: a hand computation, GQA expansion, fully-masked rows."""

import math

import torch

from headwise.core.reference import naive_attention
from headwise.patterns import Causal


def test_hand_computed_two_tokens():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=torch.float64)  # (1, 1, 2, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0], [3.0]]]], dtype=torch.float64)
    out, lse = naive_attention(q, k, v, Causal(), scale=1.0)
    # row 0 sees key 0 only; row 1 scores (0, 2) -> weights (1, e^2) / (1 + e^2)
    w = math.exp(2) / (1 + math.exp(2))
    assert out[0, 0, 0, 0].item() == 1.0
    assert abs(out[0, 0, 1, 0].item() - ((1 - w) * 1 + w * 3)) < 1e-15
    assert abs(lse[0, 0, 1].item() - math.log(1 + math.exp(2))) < 1e-15


def test_gqa_equals_repeated_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 9, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 3, generator=g, dtype=torch.float64)
    a, _ = naive_attention(q, k, v)
    b, _ = naive_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fully_masked_rows_are_zero():
    q = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    out, lse = naive_attention(q, q, q, Causal(offset=-2))
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.isinf(lse[0, 0, :2]).all() and not torch.isnan(out).any()
    out.sum().backward()
    assert not torch.isnan(q.grad).any()
