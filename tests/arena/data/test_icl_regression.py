"""In-context regression data and baselines: shapes, seeding, and the baselines' MSE on a large sample."""

import pytest
import torch

from headwise.arena.data import (gd_one_step_predict, gd_optimal_step, icl_regression_batch, icl_tokens,
                                 ridge_predict, zero_predict)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_and_tokens():
    x, y, w = icl_regression_batch(7, dim=5, num_context=40, generator=_gen())
    assert x.shape == (7, 41, 5) and y.shape == (7, 41) and w.shape == (7, 5) and x.dtype == torch.float32
    z = icl_tokens(x, y)
    assert z.shape == (7, 41, 6)
    assert torch.equal(z[:, :, :5], x) and torch.equal(z[:, :-1, 5], y[:, :-1]) and (z[:, -1, 5] == 0).all()
    assert y[:, -1].abs().sum() > 0  # the query label itself is kept in y


def test_noise_free_labels_are_linear():
    x, y, w = icl_regression_batch(4, noise_var=0.0, dtype=torch.float64, generator=_gen())
    torch.testing.assert_close(y, torch.einsum("bnd,bd->bn", x, w), rtol=0, atol=1e-12)


def test_seed_reproducible():
    a = icl_regression_batch(3, generator=_gen(5))
    b = icl_regression_batch(3, generator=_gen(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_baselines_mse_large_sample():
    """Defaults d=5, n=40, sigma^2=0.1: ridge ~0.115, optimal one-step GD ~0.24, zero ~1.10 (std err < 0.005)."""
    x, y, _ = icl_regression_batch(50_000, dtype=torch.float64, generator=_gen(11))
    mse = {f.__name__: ((f(x, y) - y[:, -1]) ** 2).mean().item()
           for f in (ridge_predict, gd_one_step_predict, zero_predict)}
    eta = gd_optimal_step(40, 5, 0.1)
    assert mse["ridge_predict"] == pytest.approx(0.1145, abs=0.004)
    assert mse["gd_one_step_predict"] == pytest.approx(1 - eta + 0.1, abs=0.006)  # 0.2398
    assert mse["zero_predict"] == pytest.approx(1.1, abs=0.02)
    # the step size is optimal: nudging it either way makes the MSE worse on the same sample
    for other in (0.8 * eta, 1.2 * eta):
        assert ((gd_one_step_predict(x, y, eta=other) - y[:, -1]) ** 2).mean().item() > mse["gd_one_step_predict"]


def test_ridge_is_exact_without_noise():
    x, y, w = icl_regression_batch(5, noise_var=0.0, dtype=torch.float64, generator=_gen())
    torch.testing.assert_close(ridge_predict(x, y, noise_var=0.0), y[:, -1], rtol=0, atol=1e-10)


def test_ridge_ignores_query_label():
    x, y, _ = icl_regression_batch(5, dtype=torch.float64, generator=_gen())
    y2 = y.clone()
    y2[:, -1] = 1e6
    assert torch.equal(ridge_predict(x, y), ridge_predict(x, y2))
    assert torch.equal(gd_one_step_predict(x, y), gd_one_step_predict(x, y2))


@pytest.mark.parametrize("n", [10, 100], ids=lambda n: f"n{n}")
def test_other_context_lengths(n):
    x, y, _ = icl_regression_batch(5_000, num_context=n, dtype=torch.float64, generator=_gen(n))
    mse_ridge = ((ridge_predict(x, y) - y[:, -1]) ** 2).mean().item()
    mse_gd = ((gd_one_step_predict(x, y) - y[:, -1]) ** 2).mean().item()
    assert mse_ridge < mse_gd and mse_gd == pytest.approx(1 - gd_optimal_step(n, 5, 0.1) + 0.1, rel=0.08)


@pytest.mark.parametrize("kwargs,err", [
    (dict(dim=0), ValueError), (dict(num_context=1.5), TypeError), (dict(noise_var=-0.1), ValueError),
    (dict(generator=1), TypeError)], ids=["dim0", "float-n", "neg-noise", "bad-generator"])
def test_bad_arguments(kwargs, err):
    kw = dict(generator=_gen())
    kw.update(kwargs)
    with pytest.raises(err):
        icl_regression_batch(2, **kw)


def test_bad_shapes():
    with pytest.raises(ValueError, match="y must be"):
        ridge_predict(torch.zeros(2, 5, 3), torch.zeros(2, 4))
