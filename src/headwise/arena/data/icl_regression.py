"""In-context linear regression and its closed-form baselines.

Paper: He, Pan, Chen, Yang, "In-Context Linear Regression Demystified: Training Dynamics and Mechanistic
Interpretability of Multi-Head Softmax Attention" (ICML 2025), isotropic setting::

    x_1 .. x_n, x_q ~ N(0, I_d)   i.i.d.        w ~ N(0, I_d / d)        y_l = w^T x_l + eps_l,  eps_l ~ N(0, sigma^2)

with the issue's defaults ``d = 5``, ``n = 40`` context pairs, ``sigma^2 = noise_var = 0.1``. The prior scale
``1/d`` makes ``E[y^2] = 1 + sigma^2 = 1.1``, the MSE of predicting zero. The model sees the tokens
``z_l = [x_l; y_l]`` and the query ``[x_q; 0]`` (``icl_tokens``) and predicts ``y_q``.

Baselines for the query (all take the ``(x, y)`` of ``icl_regression_batch``; the query's ``y`` is never read):

* ``ridge_predict``: the posterior mean ``x_q^T (X^T X + sigma^2 d I)^-1 X^T y`` -- Bayes-optimal under the prior
  above; its expected test MSE at the defaults is about 0.115 (``sigma^2`` plus the posterior variance).
* ``gd_one_step_predict``: one gradient step from ``w = 0`` on the least-squares loss ``(1/2n) sum (y_l - w^T x_l)^2``
  with step ``eta``: ``x_q^T (eta / n) X^T y``. By default ``eta`` is the step that minimises the expected MSE
  for Gaussian data, ``eta* = n / (n + d + 1 + sigma^2 d)`` (from ``E[(X^T X)^2] = n (n + d + 1) I``), giving
  ``MSE = 1 - eta* + sigma^2``, about 0.240 at the defaults. (Our derivation; the paper compares the trained
  multi-head model, a "debiased" GD predictor, with GD and the Bayes-optimal ridge.)
* ``zero_predict``: 0, MSE ``1 + sigma^2`` = 1.1.

>>> g = torch.Generator().manual_seed(0)
>>> x, y, w = icl_regression_batch(64, dim=5, num_context=40, noise_var=0.1, generator=g)  # [64,41,5] [64,41] [64,5]
>>> mse = ((ridge_predict(x, y, noise_var=0.1) - y[:, -1]) ** 2).mean()                   # about 0.115
"""

from __future__ import annotations

import torch

from headwise.arena.data._common import check_generator
from headwise.checks import check_positive_int

__all__ = ["icl_regression_batch", "icl_tokens", "ridge_predict", "gd_one_step_predict", "gd_optimal_step",
           "zero_predict"]


def _check_noise_var(noise_var) -> None:
    if isinstance(noise_var, bool) or not isinstance(noise_var, (int, float)):
        raise TypeError(f"noise_var must be a number >= 0, got noise_var={noise_var!r}")
    if noise_var < 0:
        raise ValueError(f"noise_var must be >= 0, got noise_var={noise_var!r}")


def icl_regression_batch(batch: int, *, dim: int = 5, num_context: int = 40, noise_var: float = 0.1,
                         dtype: torch.dtype = torch.float32,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch`` independent regression tasks, each with ``num_context`` pairs and one query (the last row).

    Returns ``x`` ``[batch, num_context + 1, dim]``, ``y`` ``[batch, num_context + 1]`` (``y[:, -1]`` is the
    query's noisy target) and the task vectors ``w`` ``[batch, dim]``.
    """
    check_positive_int("batch", batch)
    check_positive_int("dim", dim)
    check_positive_int("num_context", num_context)
    _check_noise_var(noise_var)
    check_generator(generator)
    n = num_context + 1
    w = torch.randn(batch, dim, generator=generator, dtype=torch.float64) / dim**0.5  # (B, d)
    x = torch.randn(batch, n, dim, generator=generator, dtype=torch.float64)  # (B, n+1, d)
    noise = torch.randn(batch, n, generator=generator, dtype=torch.float64) * noise_var**0.5  # (B, n+1)
    y = torch.einsum("bnd,bd->bn", x, w) + noise  # (B, n+1)
    return x.to(dtype), y.to(dtype), w.to(dtype)


def icl_tokens(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tokens ``[x_l; y_l]`` ``[B, n+1, d+1]`` with the query's label (last row) set to 0."""
    _check_xy(x, y)
    y = y.clone()
    y[:, -1] = 0
    return torch.cat([x, y.unsqueeze(-1)], dim=-1)  # (B, n+1, d+1)


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, n+1, d] tensor, got shape {getattr(x, 'shape', None)}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:2]:
        raise ValueError(f"y must be [B, n+1] matching x {tuple(x.shape)}, got shape {getattr(y, 'shape', None)}")
    if x.shape[1] < 2:
        raise ValueError(f"need at least one context pair plus the query, got x.shape={tuple(x.shape)}")


def ridge_predict(x: torch.Tensor, y: torch.Tensor, *, noise_var: float = 0.1) -> torch.Tensor:
    """Bayes-optimal prediction ``[B]`` for the query: ridge with ``lambda = noise_var * d`` (prior ``N(0, I/d)``)."""
    _check_xy(x, y)
    _check_noise_var(noise_var)
    xc, yc, xq = x[:, :-1].double(), y[:, :-1].double(), x[:, -1].double()  # (B, n, d) (B, n) (B, d)
    d = x.shape[-1]
    gram = xc.transpose(1, 2) @ xc + noise_var * d * torch.eye(d, dtype=torch.float64)  # (B, d, d)
    w_hat = torch.linalg.solve(gram, (xc.transpose(1, 2) @ yc.unsqueeze(-1)))  # (B, d, 1)
    return (xq.unsqueeze(1) @ w_hat).reshape(-1).to(x.dtype)  # (B,)


def gd_optimal_step(num_context: int, dim: int, noise_var: float) -> float:
    """The step ``n / (n + d + 1 + sigma^2 d)`` minimising the expected MSE of one GD step from zero."""
    check_positive_int("num_context", num_context)
    check_positive_int("dim", dim)
    _check_noise_var(noise_var)
    return num_context / (num_context + dim + 1 + noise_var * dim)


def gd_one_step_predict(x: torch.Tensor, y: torch.Tensor, *, noise_var: float = 0.1,
                        eta: float | None = None) -> torch.Tensor:
    """One gradient-descent step from ``w = 0``: ``x_q^T (eta / n) X^T y``, ``[B]``; ``eta=None`` uses the optimum."""
    _check_xy(x, y)
    n, d = x.shape[1] - 1, x.shape[2]
    if eta is None:
        eta = gd_optimal_step(n, d, noise_var)
    elif isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a number or None, got eta={eta!r}")
    xc, yc, xq = x[:, :-1].double(), y[:, :-1].double(), x[:, -1].double()
    w_hat = eta / n * torch.einsum("bnd,bn->bd", xc, yc)  # (B, d)
    return (w_hat * xq).sum(-1).to(x.dtype)  # (B,)


def zero_predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The trivial baseline: predict 0 for every query, ``[B]``."""
    _check_xy(x, y)
    return x.new_zeros(x.shape[0])
