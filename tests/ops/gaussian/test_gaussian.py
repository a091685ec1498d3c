"""GAAM's weights in closed form against the literal product of Gaussian densities (float64), and the
Importance Factor."""

import pytest
import torch

from headwise.ops.gaussian import (
    gaussian_weights,
    importance_factor,
    naive_gaussian_weights,
)
from common import F64, assert_same_forward_and_grads


# (B, H, N, d, G): odd sizes, one Gaussian, one token / one feature
WEIGHTS = {"B2-H3-N7-d5-G4": (2, 3, 7, 5, 4), "B1-H1-N63-d16-G1": (1, 1, 63, 16, 1), "B3-H2-N1-d9-G3": (3, 2, 1, 9, 3),
           "B1-H4-N500-d6-G2": (1, 4, 500, 6, 2)}


@pytest.mark.parametrize("axis", [-1, -2], ids=["features", "tokens"])
@pytest.mark.parametrize("case", WEIGHTS, ids=list(WEIGHTS))
def test_closed_form_matches_product_of_densities(case, axis):
    B, H, N, d, G = WEIGHTS[case]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, H, N, d, dtype=F64, generator=gen, requires_grad=True)
    delta = (0.5 * torch.randn(H, G, dtype=F64, generator=gen)).requires_grad_()
    c = (torch.rand(H, G, dtype=F64, generator=gen) + 0.7).requires_grad_()
    w, ref = gaussian_weights(x, delta, c, axis), naive_gaussian_weights(x, delta, c, axis)
    if x.shape[axis] == 1:  # sigma^2 = eps: the literal product underflows to 0/0, the normalised weight is 1
        assert torch.equal(w, torch.ones_like(w))
        return
    torch.testing.assert_close(w.sum(axis), torch.ones_like(w.sum(axis)), rtol=1e-12, atol=1e-12)
    assert_same_forward_and_grads(w, ref, [x, delta, c], dict(rtol=1e-10, atol=1e-12),
                                  grad_tol=dict(rtol=1e-8, atol=1e-10))


def test_closed_form_survives_where_the_product_underflows():
    x = torch.randn(1, 1, 4, 64) * 4
    delta, c = torch.zeros(1, 8), torch.full((1, 8), 0.3)
    w = gaussian_weights(x, delta, c, -1)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 1, 4))
    torch.testing.assert_close(w.double(), naive_gaussian_weights(x.double(), delta.double(), c.double(), -1),
                               rtol=1e-4, atol=1e-6)


def test_importance_factor_is_min_max_normalised():
    da = torch.tensor([[0.2, 0.5], [0.3, 1.0]])
    torch.testing.assert_close(importance_factor(da), (da - 0.2) / 0.8)
    assert torch.equal(importance_factor(torch.full((3, 2), 0.7)), torch.zeros(3, 2))
