"""Decay rates (ALiBi slopes scaled by depth) and the shared normalizer helpers."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.ops.linear import alibi_slopes, decay_rates
from headwise.ops.linear.base import NORMALIZER_EPS, apply_normalizer, with_normalizer


def test_alibi_slopes_power_of_two():
    assert alibi_slopes(8) == pytest.approx([2.0 ** -(h + 1) for h in range(8)])
    assert alibi_slopes(1) == pytest.approx([2.0 ** -8])


def test_alibi_slopes_other_counts():
    # the nearest smaller power of two (4: 2^-2, 2^-4, 2^-6, 2^-8), then every other slope of 8 (2^-1, 2^-3)
    assert alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_decay_rates_depth_schedule():
    slopes = torch.tensor(alibi_slopes(8), dtype=torch.float64)
    torch.testing.assert_close(decay_rates(8), torch.exp(-slopes))
    torch.testing.assert_close(decay_rates(8, layer=0, num_layers=12), torch.exp(-slopes * (1 + 1e-5)))
    torch.testing.assert_close(decay_rates(8, layer=11, num_layers=12), torch.exp(-slopes * 1e-5))
    torch.testing.assert_close(decay_rates(8, layer=3, num_layers=7), torch.exp(-slopes * (1 - 3 / 6 + 1e-5)))
    lam = decay_rates(8, layer=5, num_layers=12, dtype=torch.float32)
    assert lam.dtype == torch.float32 and bool(((lam > 0) & (lam < 1)).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads=0), "heads must be a positive int"),
    (dict(heads=8, layer=12, num_layers=12), "0 <= layer < num_layers"),
    (dict(heads=8, layer=-1, num_layers=4), "0 <= layer < num_layers"),
    (dict(heads=8, layer=1.0, num_layers=4), "layer must be an int"),
])
def test_decay_rates_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        decay_rates(**kwargs)


def test_normalizer_column():
    v = torch.randn(2, 3, 5, 4)
    aug = with_normalizer(v)
    assert aug.shape == (2, 3, 5, 5) and bool((aug[..., -1] == 1).all())
    o = torch.cat([torch.full((1, 1, 1, 2), 6.0), torch.full((1, 1, 1, 1), 3.0)], -1)
    torch.testing.assert_close(apply_normalizer(o), torch.full((1, 1, 1, 2), 6.0 / (3.0 + NORMALIZER_EPS)))
    assert not math.isnan(apply_normalizer(torch.zeros(1, 1, 1, 3)).sum().item())
