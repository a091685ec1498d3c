"""Spectral gating: the all-ones filter is the identity; a filter that is the FFT of a kernel is the circular
convolution with it (:func:`headwise.variants.spectral.naive_circular_conv`)."""

import pytest
import torch

import headwise
from headwise.variants.spectral import SpectralGating, naive_circular_conv
from common import assert_all_params_get_grads, rand


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (4, 4), (6, 7)], ids=lambda v: str(v))
def test_spectral_all_ones_filter_is_identity(h, w):
    m = SpectralGating(5, grid=(h, w)).double()
    with torch.no_grad():
        m.filter.zero_()
        m.filter[..., 0] = 1.0
    x = rand(2, h * w, 5)
    torch.testing.assert_close(m(x), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w", [(3, 5), (4, 4), (6, 7)], ids=lambda v: str(v))
def test_spectral_filter_is_a_circular_convolution(h, w):
    """A filter that is the unnormalized FFT of a real kernel computes the circular convolution with it."""
    C = 3
    kernel = rand(h, w, C, seed=2)  # (h, w, C)
    m = SpectralGating(C, grid=(h, w)).double()
    with torch.no_grad():
        m.filter.copy_(torch.view_as_real(torch.fft.rfft2(kernel, dim=(0, 1))))
    x = rand(2, h * w, C)
    torch.testing.assert_close(m(x), naive_circular_conv(x, kernel, h, w), rtol=1e-10, atol=1e-10)


def test_spectral_grads_shapes_and_errors():
    m = headwise.create("spectral(grid=(3, 4))", dim=6)
    out = m(torch.randn(2, 12, 6))
    assert out.shape == (2, 12, 6)
    assert_all_params_get_grads(m, out)
    assert SpectralGating(4, grid=5).config.grid == (5, 5)
    with pytest.raises(ValueError, match=r"x must have N = tokens = 12 tokens"):
        m(torch.randn(2, 13, 6))
    with pytest.raises(ValueError, match=r"grid must be \(h, w\) positive ints"):
        SpectralGating(4, grid=(0, 3))
    with pytest.raises(ValueError, match="bad config for variant 'spectral'.*grid"):
        headwise.create("spectral", dim=4)
