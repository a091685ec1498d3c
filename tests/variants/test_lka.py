"""LKA against delta kernels (identity convolutions square the input) and its receptive field."""

import pytest
import torch

import headwise
from headwise.variants.lka import LargeKernelAttention
from common import F64, assert_all_params_get_grads, rand


@pytest.mark.parametrize("kernel_size,dilation,local,far", [(21, 3, 5, 7), (7, 2, 3, 5), (5, 1, 1, 5)],
                         ids=["K21-d3", "K7-d2", "K5-d1"])
def test_lka_decomposition_sizes(kernel_size, dilation, local, far):
    m = LargeKernelAttention(8, kernel_size=kernel_size, dilation=dilation)
    assert (m.local_size, m.dilated_size) == (local, far)
    assert m.conv_spatial.dilation == (dilation, dilation)


@pytest.mark.parametrize("H,W", [(1, 1), (9, 7), (16, 16)], ids=lambda v: str(v))
def test_lka_identity_convolutions_square_the_input(H, W):
    """With delta kernels and an identity 1x1 convolution the attention map is x itself: output x * x."""
    m = LargeKernelAttention(6).double()
    with torch.no_grad():
        for conv in (m.conv0, m.conv_spatial):
            conv.weight.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
            conv.bias.zero_()
        m.conv1.weight.copy_(torch.eye(6)[:, :, None, None])
        m.conv1.bias.zero_()
    x = rand(2, 6, H, W)
    torch.testing.assert_close(m(x), x * x, rtol=1e-12, atol=1e-12)


def test_lka_receptive_field_is_the_large_kernel():
    """The decomposed kernel (K=21, d=3) spans (2d-1) + d*(ceil(K/d)-1) = 5 + 3*6 = 23 >= K pixels per side."""
    m = LargeKernelAttention(1).double()
    with torch.no_grad():
        for conv in (m.conv0, m.conv_spatial, m.conv1):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    x = torch.zeros(1, 1, 41, 41, dtype=F64, requires_grad=True)
    attn = m.conv1(m.conv_spatial(m.conv0(x)))
    (g,) = torch.autograd.grad(attn[0, 0, 20, 20], x)
    rows = g[0, 0].abs().sum(1).nonzero().squeeze(1)
    assert rows.max() - rows.min() + 1 == 5 + 3 * (7 - 1)


def test_lka_shapes_and_grads():
    m = headwise.create("lka(kernel_size=7, dilation=2)", dim=4)
    out = m(torch.randn(2, 4, 5, 9))
    assert out.shape == (2, 4, 5, 9)
    assert_all_params_get_grads(m, out)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=8, kernel_size=20), "kernel_size must be an odd int"),
    (dict(dim=8, kernel_size=7, dilation=9), "dilation must not exceed kernel_size"),
    (dict(dim=0), "dim must be a positive int"),
], ids=["even-kernel", "dilation-too-big", "dim-0"])
def test_lka_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LargeKernelAttention(**kwargs)


def test_lka_bad_input():
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\] with C = dim = 8"):
        LargeKernelAttention(8)(torch.randn(2, 10, 8))
