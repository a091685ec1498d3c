"""MoA's plan search: per head, the elastic rule ``(alpha, beta)`` that minimizes the profiled loss increase
under a density budget, at several lengths at once (a multi-objective MILP, solved with ``scipy.optimize.milp``).

Notation (MoA, Fu et al., 2024, Sec. 4, "Optimization"): heads ``v = 1..V`` (all layers), candidate rules
``c = 1..C``, lengths ``N_k``; binary ``x[v, c]`` picks one rule per head. At length ``N_k`` the estimated loss
increase is ``Z_k(x) = sum_{v,c} L_k[v, c] x[v, c]`` with ``L_k[v, c]`` the head's influence summed over the
causal pairs rule ``c`` drops (see :mod:`headwise.moa.profile`), and the density is
``D_k(x) = mean_v d_k[v, c(v)]`` (attended over causal pairs). The problem

.. math::

    \\min_x \\ (Z_1(x), \\dots, Z_K(x)) \\quad \\text{s.t.} \\quad \\textstyle\\sum_c x[v, c] = 1,
    \\quad D_k(x) \\le \\text{budget} \\ \\forall k

is solved for its Pareto front by the epsilon-constraint method, as in the authors' optimizer: each objective in
turn is minimized while the others are capped at grid points of their range (``points`` per objective); each
such MILP is solved lexicographically (then the other objectives are minimized at the optimum of the first), so
every plan returned is Pareto-optimal. (The authors hold the other objectives in bands, lower and upper
bounds, then filter the dominated plans; upper caps alone make each solution Pareto-optimal by itself.) MoA then keeps the Pareto plan with the lowest validation loss;
:func:`select_plan` does that given a validation function.

Choices: the density budget binds the mean over all heads of the model at every length (the paper's "density
constraint"; the authors' option of at most a few distinct rules per layer is not implemented); without a
validation function the plan with the smallest sum of range-normalized objectives is chosen.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from headwise.patterns.moa_plan import MoAPlan, causal_density, span_at
from headwise.patterns import Causal, SinkWindow

__all__ = ["Solution", "default_rules", "rule_table", "solve", "pareto_front", "select_plan", "solution_plan",
           "search_plans"]

Rule = tuple[float, float]  # (alpha in tokens, beta)


@dataclass(frozen=True, eq=False)
class Solution:
    """One plan of the search: ``choice[v]`` is the rule index of head ``v``; ``losses[k]`` and ``densities[k]``
    are ``Z_k`` and ``D_k`` at the ``k``-th length."""

    choice: np.ndarray  # (V,) int
    losses: np.ndarray  # (K,)
    densities: np.ndarray  # (K,)


def default_rules(shortest: int) -> list[Rule]:
    """The candidate grid: ``alpha`` in ``{0, 1/8, 1/4, 1/2} x shortest`` tokens, ``beta`` in
    ``{0, 1/8, 1/4, 1/2, 3/4, 1}`` (24 rules; ``(0, 1)`` is dense causal). Choice: MoA's grid is model-specific;
    this one scales with the shortest profiled length."""
    if isinstance(shortest, bool) or not isinstance(shortest, int) or shortest < 1:
        raise ValueError(f"shortest must be a positive int, got shortest={shortest!r}")
    alphas = [0.0, shortest / 8, shortest / 4, shortest / 2]
    betas = [0.0, 0.125, 0.25, 0.5, 0.75, 1.0]
    return [(a, b) for a in alphas for b in betas]


def _check_rules(rules) -> list[Rule]:
    rules = list(rules)
    if not rules:
        raise ValueError("rules must hold at least one (alpha, beta) pair, got rules=[]")
    for i, r in enumerate(rules):
        ok = isinstance(r, (tuple, list)) and len(r) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r)
        if not ok:
            raise ValueError(f"rules[{i}] must be an (alpha, beta) pair of finite numbers, got {r!r}")
    return [(float(a), float(b)) for a, b in rules]


def rule_table(influence: dict[int, torch.Tensor], rules: Sequence[Rule], sinks: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Loss and density of every rule for every head at every profiled length.

    ``influence``: ``{N: [layers, heads, N, N]}`` from :class:`~headwise.moa.profile.InfluenceProfiler`.
    Returns ``losses`` ``[K, V, C]`` (``V = layers * heads``, lengths in ascending order) and ``densities``
    ``[K, C]``.
    """
    rules = _check_rules(rules)
    if not isinstance(influence, dict) or not influence:
        raise ValueError("influence must be a non-empty {length: [layers, heads, N, N] tensor} dict")
    shapes = set()
    losses, densities = [], []
    for n in sorted(influence):
        e = influence[n]
        if not isinstance(e, torch.Tensor) or e.dim() != 4 or tuple(e.shape[2:]) != (n, n):
            got = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"influence[{n}] must be a [layers, heads, {n}, {n}] tensor, got {got}")
        shapes.add(tuple(e.shape[:2]))
        causal = Causal().dense_mask(n, n)[0]  # (N, N)
        e = e.double().reshape(-1, n, n)  # (V, N, N)
        row_l, row_d = [], []
        for a, b in rules:
            window = SinkWindow(span_at(a, b, n), sinks)
            dropped = causal & ~window.dense_mask(n, n)[0]  # (N, N)
            row_l.append((e * dropped).sum((1, 2)))  # (V,)
            row_d.append(causal_density(window, n))
        losses.append(torch.stack(row_l, 1).numpy())  # (V, C)
        densities.append(row_d)
    if len(shapes) != 1:
        raise ValueError(f"influence tensors disagree on [layers, heads]: {sorted(shapes)}")
    return np.stack(losses), np.asarray(densities, dtype=np.float64)


def _problem(losses: np.ndarray, densities: np.ndarray, budget: float):
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 3 or min(losses.shape) < 1:
        raise ValueError(f"losses must be [K, V, C] with K, V, C >= 1, got shape {losses.shape}")
    K, V, C = losses.shape
    densities = np.asarray(densities, dtype=np.float64)
    try:
        densities = np.broadcast_to(densities[:, None, :] if densities.ndim == 2 else densities, (K, V, C))
    except ValueError:
        raise ValueError(f"densities must be [K, C] or [K, V, C] for losses {losses.shape}, got {densities.shape}") from None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"density budget must be a number in (0, 1], got budget={budget!r}")
    sparsest = densities.min(2).mean(1)  # (K,)
    if (sparsest > budget + 1e-12).any():
        k = int(np.argmax(sparsest - budget))
        raise ValueError(f"density budget={budget} is below the sparsest plan's density {sparsest[k]:.4f} "
                         f"(length index {k}); add sparser rules or raise the budget")
    from scipy.optimize import LinearConstraint  # imported on use: scipy is slow to import

    Z = losses.reshape(K, V * C)
    scale = np.abs(Z).max(1, keepdims=True)  # (K, 1): the MILPs see objectives of order 1 (solver tolerances)
    Z = Z / np.where(scale > 0, scale, 1.0)
    D = densities.reshape(K, V * C) / V
    onehot = np.kron(np.eye(V), np.ones((1, C)))  # (V, V*C)
    base = [LinearConstraint(onehot, 1, 1), LinearConstraint(D, -np.inf, budget)]
    return Z, D, base, (K, V, C), _undominated(losses, densities).reshape(-1)


def _undominated(losses: np.ndarray, densities: np.ndarray) -> np.ndarray:
    """``[V, C]`` bool: rule ``c`` is kept for head ``v`` unless another rule is no worse in every loss and
    density and better in one (or identical with a lower index). Swapping a dominated rule for its dominator
    never hurts an objective or a constraint, so the MILPs may skip dominated rules: this only removes the
    symmetric copies that slow branch and bound down."""
    a = np.concatenate([losses, densities], 0)  # (2K, V, C)
    le = np.all(a[:, :, :, None] <= a[:, :, None, :], 0)  # (V, C', C): c' no worse than c
    lt = np.any(a[:, :, :, None] < a[:, :, None, :], 0)  # c' better somewhere
    C = a.shape[2]
    lower = np.arange(C)[:, None] < np.arange(C)[None, :]  # (C', C): c' < c
    dominated = le & (lt | lower)  # (V, C', C)
    return ~dominated.any(1)


def _milp(c: np.ndarray, constraints, allowed: np.ndarray) -> np.ndarray | None:
    from scipy.optimize import Bounds, milp

    res = milp(c, integrality=np.ones_like(c), bounds=Bounds(0, allowed.astype(np.float64)), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    return None if res.x is None else np.round(res.x)


def _lexicographic(Z, base, allowed, primary: int, extra=()) -> np.ndarray | None:
    """Minimize ``Z[primary]``; then, at that optimum, the other objectives (range-scaled)."""
    cons = list(base) + list(extra)
    x = _milp(Z[primary], cons, allowed)
    if x is None or Z.shape[0] == 1:
        return x
    best = float(Z[primary] @ x)
    tol = 1e-9 * max(1.0, abs(best))
    others = [j for j in range(Z.shape[0]) if j != primary]
    scale = np.maximum(np.abs(Z[others]).max(1, keepdims=True), 1e-300)
    c2 = (Z[others] / scale).sum(0)
    from scipy.optimize import LinearConstraint

    x2 = _milp(c2, cons + [LinearConstraint(Z[primary][None], -np.inf, best + tol)], allowed)
    return x if x2 is None else x2


def _solution(x: np.ndarray, losses: np.ndarray, D, shape) -> Solution:
    K, V, C = shape
    choice = x.reshape(V, C).argmax(1)
    picked = np.asarray(losses, dtype=np.float64)[:, np.arange(V), choice].sum(1)  # (K,) in the caller's units
    return Solution(choice=choice, losses=picked, densities=D @ x)


def solve(losses, densities, budget: float, *, primary: int = 0) -> Solution:
    """The plan minimizing ``Z_primary`` under the density budget at every length (ties broken by the other
    objectives). ``losses`` ``[K, V, C]``, ``densities`` ``[K, C]`` or ``[K, V, C]``."""
    Z, D, base, shape, allowed = _problem(losses, densities, budget)
    if isinstance(primary, bool) or not isinstance(primary, int) or not 0 <= primary < shape[0]:
        raise ValueError(f"primary must be an objective index in [0, {shape[0]}), got primary={primary!r}")
    x = _lexicographic(Z, base, allowed, primary)
    if x is None:
        raise ValueError(f"no plan satisfies density budget={budget}")
    return _solution(x, losses, D, shape)


def pareto_front(losses, densities, budget: float, *, points: int = 5) -> list[Solution]:
    """Pareto-optimal plans over the ``K`` per-length losses (epsilon-constraint method, ``points`` grid points
    per objective: ``K * (points - 1) ** (K - 1)`` lexicographic MILPs), distinct and sorted by ``losses``."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got points={points!r}")
    from scipy.optimize import LinearConstraint

    Z, D, base, shape, allowed = _problem(losses, densities, budget)
    K = shape[0]
    anchors = [_lexicographic(Z, base, allowed, k) for k in range(K)]
    if any(x is None for x in anchors):
        raise ValueError(f"no plan satisfies density budget={budget}")
    found = {tuple(x.astype(int)): x for x in anchors}
    if K > 1:
        values = np.stack([Z @ x for x in anchors], 1)  # (K objectives, K anchors)
        caps = np.linspace(values.min(1), values.max(1), points).T[:, 1:]  # (K, points - 1) upper bounds
        slack = 1e-9 * np.maximum(1.0, np.abs(caps).max(1))
        for p in range(K):
            others = [j for j in range(K) if j != p]
            for bands in itertools.product(range(points - 1), repeat=K - 1):
                extra = [LinearConstraint(Z[j][None], -np.inf, caps[j, b] + slack[j]) for j, b in zip(others, bands)]
                x = _lexicographic(Z, base, allowed, p, extra)
                if x is not None:
                    found.setdefault(tuple(x.astype(int)), x)
    sols = [_solution(x, losses, D, shape) for x in found.values()]
    objs = np.stack([s.losses for s in sols])  # (P, K)
    tol = 1e-9 * np.maximum(1.0, np.abs(objs).max(0))
    keep = []
    for i, s in enumerate(sols):
        dominated = np.any(np.all(objs <= objs[i] + tol, 1) & np.any(objs < objs[i] - tol, 1))
        duplicate = any(np.all(np.abs(objs[j] - objs[i]) <= tol) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    return sorted((sols[i] for i in keep), key=lambda s: tuple(s.losses))


def select_plan(front: Sequence[Solution], validate: Callable[[Solution], float] | None = None) -> Solution:
    """MoA's final step: the Pareto plan with the lowest ``validate(solution)`` (a validation loss); without
    ``validate``, the smallest sum over lengths of losses scaled by each length's largest loss on the front."""
    front = list(front)
    if not front:
        raise ValueError("front is empty: nothing to select")
    if validate is not None:
        return min(front, key=validate)
    objs = np.stack([s.losses for s in front])  # (P, K)
    score = (objs / np.maximum(np.abs(objs).max(0), 1e-300)).sum(1)
    return front[int(np.argmin(score))]


def solution_plan(solution: Solution, rules: Sequence[Rule], layers: int, heads: int, sinks: int = 0,
                  meta: dict | None = None) -> MoAPlan:
    """The :class:`MoAPlan` of a solution whose heads ``v = layer * heads + h`` picked ``rules[choice[v]]``."""
    if len(solution.choice) != layers * heads:
        raise ValueError(f"the solution has {len(solution.choice)} heads, expected {layers=} x {heads=}")
    picked = [rules[c] for c in solution.choice]
    return MoAPlan(alphas=[[picked[l * heads + h][0] for h in range(heads)] for l in range(layers)],
                   betas=[[picked[l * heads + h][1] for h in range(heads)] for l in range(layers)],
                   sinks=sinks, meta=dict(meta or {}))


def search_plans(influence: dict[int, torch.Tensor], *, budget: float, rules: Sequence[Rule] | None = None,
                 sinks: int = 0, points: int = 5) -> tuple[list[MoAPlan], list[Solution]]:
    """Profiled influence ``{N: [layers, heads, N, N]}`` -> the Pareto front as :class:`MoAPlan` s (same order as
    the returned solutions). ``rules`` defaults to :func:`default_rules` of the shortest length."""
    rules = default_rules(min(influence)) if rules is None else _check_rules(rules)
    losses, densities = rule_table(influence, rules, sinks)
    front = pareto_front(losses, densities, budget, points=points)
    layers, heads = next(iter(influence.values())).shape[:2]
    meta = lambda s: {"budget": budget, "lengths": sorted(influence),  # noqa: E731
                      "estimated_loss_increase": s.losses.tolist(), "density": s.densities.tolist()}
    return [solution_plan(s, rules, layers, heads, sinks, meta(s)) for s in front], front
