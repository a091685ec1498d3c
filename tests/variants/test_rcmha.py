"""rcmha (RCMHA) module: its materialized reference, the depthwise convolution, degenerate cases, causality."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.mha import MultiHeadAttention
from common import (
    ABS_TOL,
    assert_loads_old_checkpoint,
    assert_same_forward_and_grads,
    fused_checkpoint,
    rand,
    randomize_,
)
from headwise.variants.rcmha import RelativeConvAttention, depthwise_conv1d, naive_rcmha

DIM, HEADS = 48, 4  # head_dim 12

@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("causal,kernel_size", [(False, 3), (True, 4), (False, 4)],
                         ids=["full-k3", "causal-k4", "full-k4"])
def test_rcmha_matches_naive(N, causal, kernel_size):
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, kernel_size=kernel_size, max_distance=5, causal=causal, chunk=16).double()
    randomize_(m)
    x = rand(2, N, DIM, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_rcmha(m, x), [x, *m.parameters()], ABS_TOL, seed=1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fresh_rcmha_equals_mha(causal):
    # identity convolution and zero relative terms: plain MHA
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal() if causal else None, backend="reference").double()
    m = RelativeConvAttention(DIM, HEADS, causal=causal).double()
    m.load_state_dict(mha.state_dict(), strict=False)
    x = rand(2, 63, DIM)
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


def test_rcmha_causal_ignores_future_tokens():
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, causal=True, kernel_size=3, max_distance=4).double()
    randomize_(m)
    x = rand(1, 30, DIM)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 10, DIM, dtype=torch.float64)
    torch.testing.assert_close(m(x)[:, :20], m(x2)[:, :20], atol=1e-12, rtol=0)
    assert not torch.allclose(m(x)[:, 20:], m(x2)[:, 20:])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_weights_reproduce_the_forward(causal):
    """The matrix inspect records (the attention step on identity values), applied to the values, is the forward."""
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, causal=causal, max_distance=3, chunk=8).double()
    randomize_(m)
    x = rand(2, 19, DIM)
    p = m.attention_weights(x)  # (B, H, N, N)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:3], dtype=p.dtype), atol=1e-12, rtol=0)
    if causal:
        assert (p.triu(1).abs() < 1e-300).all()
    _, _, v = m.project(x)
    torch.testing.assert_close(m.finish(p @ v), m(x), atol=1e-12, rtol=0)


def test_fused_kv_checkpoints_still_load():
    torch.manual_seed(0)
    m = RelativeConvAttention(DIM, HEADS, max_distance=4).double()
    randomize_(m)
    fresh = RelativeConvAttention(DIM, HEADS, max_distance=4).double()
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict()), m, rand(2, 9, DIM))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=50, heads=4), "dim must be divisible by heads"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(max_distance=-1), "max_distance"),
    (dict(chunk=0), "chunk"),
    (dict(causal="no"), "causal"),
    (dict(kv_heads=2), "kv_heads"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("rcmha", **kw)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own note on its conv1d
@pytest.mark.parametrize("kernel_size", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["same", "causal"])
def test_depthwise_conv1d_equals_torch_conv1d(kernel_size, causal):
    torch.manual_seed(0)
    B, N, C = 2, 11, 5
    x = torch.randn(B, N, C, dtype=torch.float64)
    w, b = torch.randn(kernel_size, C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    xt = x.transpose(1, 2)  # (B, C, N)
    if causal:
        expected = torch.nn.functional.conv1d(torch.nn.functional.pad(xt, (kernel_size - 1, 0)), w.T[:, None], b,
                                              groups=C)
    else:
        expected = torch.nn.functional.conv1d(xt, w.T[:, None], b, padding="same", groups=C)
    torch.testing.assert_close(depthwise_conv1d(x, w, b, causal=causal), expected.transpose(1, 2), atol=1e-12, rtol=0)
