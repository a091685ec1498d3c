"""The log-sum-exp merge: attention over a union of disjoint key sets from its parts."""

import torch

from headwise.core import merge_attention
from headwise.core.reference import naive_attention
from headwise.patterns import Causal


def test_merge_of_two_key_halves_equals_full():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 30, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 30, 5, generator=g, dtype=torch.float64)
    full, full_lse = naive_attention(q, k, v)
    a, la = naive_attention(q, k[:, :, :11], v[:, :, :11])
    b, lb = naive_attention(q, k[:, :, 11:], v[:, :, 11:])
    out, lse = merge_attention(a, la, b, lb)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, full_lse, atol=1e-12, rtol=0)


def test_merge_with_empty_parts():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64)
    kv = torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64)
    a, la = naive_attention(q, kv, kv, Causal(offset=-3))  # rows 0-2 empty
    b, lb = naive_attention(q, kv, kv, Causal(offset=-10))  # all rows empty
    out, lse = merge_attention(a, la, b, lb)
    torch.testing.assert_close(out, a, atol=0, rtol=0)
    assert torch.isinf(lse[0, 0, :3]).all() and not torch.isnan(out).any()
