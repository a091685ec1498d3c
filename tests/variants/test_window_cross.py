"""ARBEx's window cross-attention against the window loop naive_window_cross_attention and plain cross-attention
written out here (float64); its relative position index and reliability balancing by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.window_cross import (
    WindowCrossAttention,
    naive_window_cross_attention,
    relative_position_index,
    reliability_balance,
)
from common import (
    F64,
    assert_all_params_get_grads,
    assert_loads_old_checkpoint,
    assert_same_grads,
    fused_checkpoint,
    rand,
)


def test_relative_position_index_counts_offsets():
    idx = relative_position_index(3)  # (9, 9)
    assert idx.shape == (9, 9) and idx.min() == 0 and idx.max() == 24
    assert (idx.diagonal() == 12).all()  # zero offset is the centre of the 5x5 table
    assert idx[0, 8] == 0 and idx[8, 0] == 24  # (0,0)-(2,2) = (-2,-2); (2,2)-(0,0) = (2,2)


@pytest.mark.parametrize("w,H,W,heads", [(1, 1, 1, 1), (3, 6, 9, 2), (4, 4, 8, 4)], ids=lambda v: str(v))
def test_window_cross_matches_window_loop(w, H, W, heads):
    torch.manual_seed(0)
    m = WindowCrossAttention(8, heads, window=w).double()
    with torch.no_grad():
        m.bias_table.normal_()
    x, q = rand(2, 8, H, W), rand(2, 8, w, w, seed=1)
    torch.testing.assert_close(m(x, q), naive_window_cross_attention(m, x, q), rtol=1e-10, atol=1e-10)


def test_window_cross_gradients_match_window_loop():
    torch.manual_seed(0)
    m = WindowCrossAttention(8, 2, window=3).double()
    with torch.no_grad():
        m.bias_table.normal_()
    x, q = rand(2, 8, 3, 6, requires_grad=True), rand(2, 8, 3, 3, seed=1, requires_grad=True)
    assert_same_grads(m(x, q), naive_window_cross_attention(m, x, q), [x, q, *m.parameters()], seed=2)


def test_window_cross_single_window_zero_bias_is_plain_cross_attention():
    """One window and a zero bias: softmax(Q K^T / sqrt(d)) V over all image tokens, Q the raw landmark tokens."""
    torch.manual_seed(0)
    m = WindowCrossAttention(8, 2, window=4).double()
    with torch.no_grad():
        m.bias_table.zero_()
    x, q = rand(2, 8, 4, 4), rand(2, 8, 4, 4, seed=1)
    t = F.layer_norm(x.flatten(2).transpose(1, 2), (8,), m.norm.weight, m.norm.bias)  # (B, 16, C)
    k = F.linear(t, m.k_proj.weight, m.k_proj.bias).view(2, 16, 2, 4).transpose(1, 2)  # (B, 2, 16, 4)
    v = F.linear(t, m.v_proj.weight, m.v_proj.bias).view(2, 16, 2, 4).transpose(1, 2)
    qh = q.flatten(2).transpose(1, 2).reshape(2, 16, 2, 4).transpose(1, 2)
    o = torch.softmax(qh @ k.transpose(-1, -2) / 2.0, -1) @ v  # (B, 2, 16, 4)
    ref = F.linear(o.transpose(1, 2).reshape(2, 16, 8), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(m(x, q), ref.transpose(1, 2).reshape(2, 8, 4, 4), rtol=1e-10, atol=1e-10)


def test_window_cross_loads_kv_proj_checkpoints():
    torch.manual_seed(0)
    m = WindowCrossAttention(8, 2, window=2).double()
    fresh = WindowCrossAttention(8, 2, window=2).double()
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict()), m, rand(2, 8, 4, 2), rand(2, 8, 2, 2, seed=1))


def test_window_cross_grads_and_errors():
    m = headwise.create("window_cross(window=2)", dim=4, heads=2)
    out = m(torch.randn(2, 4, 4, 6), torch.randn(2, 4, 2, 2))
    assert_all_params_get_grads(m, [out])
    with pytest.raises(ValueError, match="H, W multiples of window=2"):
        m(torch.randn(2, 4, 5, 6), torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"queries must be \[B, C, w, w\] = \[2, 4, 2, 2\]"):
        m(torch.randn(2, 4, 4, 6), torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="dim must be divisible by heads, got dim=6 heads=4"):
        WindowCrossAttention(6, 4)
    with pytest.raises(ValueError, match="unknown backend='nope'"):
        WindowCrossAttention(8, 2, backend="nope")


def test_reliability_balance_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=F64)
    s = torch.tensor([[0.2, 0.7, 0.1]], dtype=F64)
    a = torch.tensor([[1 / 3, 1 / 3, 1 / 3]], dtype=F64)  # uniform: confidence 0, no weight
    p = torch.softmax(logits, -1)
    c = 1 + (p * p.log()).sum() / math.log(3)
    expected = 0.25 * p + 0.75 * (c * p + (1 - c) * s)  # r = s because a's confidence is 0
    torch.testing.assert_close(reliability_balance(logits, s, a, trust=0.75), expected)
    torch.testing.assert_close(reliability_balance(logits, s, a, trust=0.0), p)
    with pytest.raises(ValueError, match="trust must be in \\[0, 1\\], got trust=2"):
        reliability_balance(logits, s, a, trust=2)
    with pytest.raises(ValueError, match="anchor_similarity must have logits' shape"):
        reliability_balance(logits, s[:, :2], a, trust=0.5)
