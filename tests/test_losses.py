"""AMCL's multi-head contrastive loss: known answers of the per-anchor terms, the temperature limits and the
maximum-likelihood temperature, gradients to the temperatures, the module against a loop-by-loop computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from headwise.losses import AMCLLoss, amcl_terms, naive_amcl_loss, temperature_regularizer
from common import F64, rand


def t(*values):
    return torch.tensor(values, dtype=F64)


def test_terms_known_answer():
    # pos: -1/0.5 + 0.1 (2 log 0.5 + 2); neg: mean(0.2/1, -0.4/0.25) - 0.1 ((log 1 + 1) + (log 0.25 + 4))
    # the logs cancel (2 log 0.5 = log 0.25): -2 + 0.2 - 0.7 - 0.5 = -3
    out = amcl_terms(t(1.0), t(0.5), t(0.2, -0.4), t(1.0, 0.25), dim=4, beta=0.1)
    assert out.item() == pytest.approx(-3.0, abs=1e-14)


def test_regularizer_known_answer():
    assert temperature_regularizer(t(1.0), 10).item() == 1.0
    assert temperature_regularizer(t(math.e), 2).item() == pytest.approx(1 + 1 / math.e, abs=1e-15)


def test_identical_positives_push_the_temperature_to_its_floor():
    # s+ = 1: d/dtau [-1/tau + beta (d/2 log tau + 1/tau)] = (1 - beta) / tau^2 + beta d / (2 tau) > 0 for beta < 1
    tau = torch.linspace(1e-3, 2.0, 50, dtype=F64).requires_grad_()
    pos = -1.0 / tau + 0.01 * temperature_regularizer(tau, 128)
    (grad,) = torch.autograd.grad(pos.sum(), tau)
    assert (grad > 0).all()


def test_positive_temperature_has_the_maximum_likelihood_optimum():
    # s < beta: the positive term is minimised at tau* = 2 (beta - s) / (beta d)
    s, beta, d = -0.5, 0.5, 4
    star = 2 * (beta - s) / (beta * d)  # = 1.0
    tau = t(0.5 * star, star, 2 * star).requires_grad_()
    (grad,) = torch.autograd.grad((-s / tau + beta * temperature_regularizer(tau, d)).sum(), tau)
    assert grad[0] < 0 and abs(grad[1].item()) < 1e-15 and grad[2] > 0


def test_gradients_to_the_temperatures_are_analytic():
    s_pos, s_neg = t(0.7, -0.1), t(0.3, -0.2, 0.9, 0.1, -0.5, 0.4).view(2, 3)
    tau_pos, tau_neg = t(0.3, 1.2).requires_grad_(), t(0.5, 0.8, 0.1, 1.5, 0.2, 0.9).view(2, 3).requires_grad_()
    d, beta = 8, 0.05
    g_pos, g_neg = torch.autograd.grad(amcl_terms(s_pos, tau_pos, s_neg, tau_neg, dim=d, beta=beta).sum(),
                                       (tau_pos, tau_neg))
    tp, tn = tau_pos.detach(), tau_neg.detach()
    torch.testing.assert_close(g_pos, s_pos / tp**2 + beta * (d / (2 * tp) - 1 / tp**2), atol=1e-12, rtol=0)
    torch.testing.assert_close(g_neg, -s_neg / (3 * tn**2) - beta * (1 / tn - 1 / tn**2), atol=1e-12, rtol=0)


def test_temperatures_stay_inside_their_limits():
    m = AMCLLoss(6, 1, tau_min=0.05, tau_max=1.5).double()
    a, b = F.normalize(rand(40, 6, seed=1), dim=-1), F.normalize(rand(40, 6, seed=2), dim=-1)
    tau = m.temperature(a, b)
    assert ((tau > 0.05) & (tau < 1.5)).all()
    with torch.no_grad():
        m.phi[2].weight.zero_()
        m.phi[2].bias.zero_()
    assert torch.equal(m.temperature(a, b), torch.full((40,), 0.05 + 1.45 / 2, dtype=F64))  # score 0: the midpoint
    with torch.no_grad():
        m.phi[2].bias.fill_(10.0)  # phi = 10 everywhere: score 600, sigmoid(-600) = 0: the floor
    torch.testing.assert_close(m.temperature(a, b), torch.full((40,), 0.05, dtype=F64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("B,H,topk", [(2, 1, None), (5, 3, 4), (7, 2, 100)], ids=["B2-H1-all", "B5-H3-top4", "B7-H2-top100"])
def test_module_matches_loops_at_constant_temperature(B, H, topk):
    m = AMCLLoss(6, H, beta=0.03, tau_min=0.1, tau_max=0.9, topk=topk).double()
    with torch.no_grad():
        m.phi[2].weight.zero_()
        m.phi[2].bias.zero_()  # tau = 0.5 for every pair
    z1, z2 = rand(B, H, 6, seed=3), rand(B, H, 6, seed=4)
    assert m(z1, z2).item() == pytest.approx(naive_amcl_loss(z1, z2, 0.5, 6, 0.03, topk), abs=1e-12)


def test_heads_add_up():
    m2 = AMCLLoss(5, 2).double()
    m1 = AMCLLoss(5, 1).double()
    m1.load_state_dict(m2.state_dict())  # the same temperature network
    z1, z2 = rand(4, 2, 5, seed=5), rand(4, 2, 5, seed=6)
    torch.testing.assert_close(m2(z1, z2), m1(z1[:, :1], z2[:, :1]) + m1(z1[:, 1:], z2[:, 1:]), atol=1e-12, rtol=0)


def test_identical_views_beat_random_views():
    m = AMCLLoss(16, 2, tau_min=0.1, tau_max=0.11).double()  # nearly constant temperature
    z = rand(8, 2, 16, seed=7)
    assert m(z, z) < m(z, rand(8, 2, 16, seed=8))


def test_gradients_reach_the_embeddings_and_every_temperature_parameter():
    m = AMCLLoss(6, 2, tau_min=0.05).double()
    z1, z2 = rand(5, 2, 6, seed=9).requires_grad_(), rand(5, 2, 6, seed=10).requires_grad_()
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(m(z1, z2), [z1, z2, *params.values()])
    for name, g in zip(["z1", "z2", *params], grads):
        assert torch.isfinite(g).all() and g.abs().max() > 0, name


@pytest.mark.parametrize("make,needle", [
    (lambda: AMCLLoss(0, 2), "dim"),
    (lambda: AMCLLoss(8, 2, tau_min=0.5, tau_max=0.5), "tau_min"),
    (lambda: AMCLLoss(8, 2, beta=-1.0), "beta"),
    (lambda: AMCLLoss(8, 2, beta=float("nan")), "beta"),
    (lambda: AMCLLoss(8, 2, topk=0), "topk"),
], ids=["dim", "tau-order", "beta-negative", "beta-nan", "topk"])
def test_bad_config_raises(make, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        make()


def test_bad_inputs_raise():
    m = AMCLLoss(4, 2)
    with pytest.raises(ValueError, match="B >= 2"):
        m(torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match="z2"):
        m(torch.randn(3, 2, 4), torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.randn(3, 2, 4), torch.randn(4, 2, 4))
    with pytest.raises(TypeError, match="z1"):
        m([[0.0]], torch.randn(3, 2, 4))
