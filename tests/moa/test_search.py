"""MoA plan search: the MILPs against exact brute force on tiny instances; the rule table; errors."""

import itertools

import numpy as np
import pytest
import torch

from headwise.moa import MoAPlan, default_rules, pareto_front, rule_table, search_plans, select_plan, solve
from headwise.patterns import Causal, SinkWindow


def brute_force(losses, densities, budget):
    """Every assignment of a rule to each head: (choice, objectives) of the feasible ones."""
    K, V, C = losses.shape
    out = []
    for choice in itertools.product(range(C), repeat=V):
        idx = np.arange(V), np.asarray(choice)
        dens = densities[:, idx[1]].mean(1)  # (K,)
        if (dens <= budget + 1e-12).all():
            out.append((np.asarray(choice), losses[:, idx[0], idx[1]].sum(1)))
    return out


def instance(seed, K, V, C):
    rng = np.random.default_rng(seed)
    densities = np.sort(rng.uniform(0.05, 1.0, size=(K, C)), axis=1)
    # sparser rules lose more, with noise so heads differ
    losses = (1 - densities)[:, None, :] * rng.uniform(0.1, 2.0, size=(1, V, 1)) + rng.uniform(0, 0.3, size=(K, V, C))
    return losses, densities


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_single_objective_equals_brute_force(seed):
    losses, densities = instance(seed, K=2, V=4, C=4)
    budget = float(np.median(densities))
    feasible = brute_force(losses, densities, budget)
    for k in range(2):
        sol = solve(losses, densities, budget, primary=k)
        best = min(obj[k] for _, obj in feasible)
        assert sol.losses[k] == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert (sol.densities <= budget + 1e-9).all()
        chosen = losses[:, np.arange(4), sol.choice].sum(1)
        assert np.allclose(chosen, sol.losses)


@pytest.mark.parametrize("seed", range(6), ids=lambda s: f"seed{s}")
def test_pareto_front_is_pareto_optimal_and_holds_each_objectives_optimum(seed):
    losses, densities = instance(seed, K=2, V=4, C=4)
    budget = float(np.median(densities))
    objs = np.stack([obj for _, obj in brute_force(losses, densities, budget)])  # (P, K)
    front = pareto_front(losses, densities, budget, points=5)
    assert front
    for s in front:
        assert (s.densities <= budget + 1e-9).all()
        strictly_better = np.all(objs <= s.losses + 1e-12, 1) & np.any(objs < s.losses - 1e-9, 1)
        assert not strictly_better.any(), f"{s.losses} is dominated by {objs[strictly_better][0]}"
    # the extreme points of the true front are found
    for k in range(2):
        assert min(s.losses[k] for s in front) == pytest.approx(objs[:, k].min(), rel=1e-9, abs=1e-12)


def test_three_lengths_front_against_brute_force():
    losses, densities = instance(11, K=3, V=3, C=5)
    budget = float(np.quantile(densities, 0.6))
    objs = np.stack([obj for _, obj in brute_force(losses, densities, budget)])
    front = pareto_front(losses, densities, budget, points=3)
    for s in front:
        assert not (np.all(objs <= s.losses + 1e-12, 1) & np.any(objs < s.losses - 1e-9, 1)).any()
    assert len({tuple(s.choice) for s in front}) == len(front)


def test_select_plan_by_validation_and_by_default():
    losses, densities = instance(3, K=2, V=4, C=4)
    front = pareto_front(losses, densities, float(np.median(densities)))
    target = front[-1]
    assert select_plan(front, validate=lambda s: 0.0 if s is target else 1.0) is target
    chosen = select_plan(front)
    scores = [sum(s.losses / np.max([t.losses for t in front], 0)) for s in front]
    assert chosen is front[int(np.argmin(scores))]
    with pytest.raises(ValueError, match="front is empty"):
        select_plan([])


def test_rule_table_sums_influence_over_dropped_causal_pairs():
    torch.manual_seed(0)
    n, sinks = 12, 2
    infl = {n: torch.rand(2, 3, n, n, dtype=torch.float64)}
    rules = [(0.0, 1.0), (3.0, 0.0), (1.0, 0.25)]
    losses, densities = rule_table(infl, rules, sinks)
    assert losses.shape == (1, 6, 3) and densities.shape == (1, 3)
    causal = Causal().dense_mask(n, n)[0]
    for c, (a, b) in enumerate(rules):
        span = int(a + b * n)
        dropped = causal & ~SinkWindow(span, sinks).dense_mask(n, n)[0]
        expected = (infl[n] * dropped).sum((-1, -2)).reshape(-1)
        assert np.allclose(losses[0, :, c], expected.numpy(), rtol=1e-13)
        assert densities[0, c] == pytest.approx((SinkWindow(span, sinks).dense_mask(n, n)[0]).sum().item() / (n * (n + 1) / 2))
    assert losses[0, :, 0].max() == 0 and densities[0, 0] == 1.0  # (0, 1) is dense causal


def test_search_plans_returns_plans_within_budget_at_every_length():
    torch.manual_seed(1)
    infl = {n: torch.rand(2, 2, n, n, dtype=torch.float64) for n in (16, 32)}
    rules = [(0.0, 1.0), (2.0, 0.0), (4.0, 0.125), (0.0, 0.5), (8.0, 0.25)]
    plans, front = search_plans(infl, budget=0.5, sinks=2, rules=rules)
    assert plans and len(plans) == len(front)
    for plan, sol in zip(plans, front):
        assert isinstance(plan, MoAPlan) and (plan.layers, plan.heads, plan.sinks) == (2, 2, 2)
        assert {(a, b) for r_a, r_b in zip(plan.alphas, plan.betas) for a, b in zip(r_a, r_b)} <= set(rules)
        for k, n in enumerate((16, 32)):
            assert plan.density(n) == pytest.approx(sol.densities[k], rel=1e-12)
            assert plan.density(n) <= 0.5 + 1e-9
        assert plan.meta["lengths"] == [16, 32]


def test_default_rules_include_dense_and_streaming():
    rules = default_rules(64)
    assert (0.0, 1.0) in rules and (16.0, 0.0) in rules and len(rules) == 24


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(budget=0.0), "budget=0.0"), (dict(budget=1.5), "budget=1.5"),
    (dict(budget=0.01), "below the sparsest plan's density"),
], ids=["zero", "above-one", "infeasible"])
def test_bad_budget(kwargs, fragment):
    losses, densities = instance(0, K=1, V=2, C=3)
    with pytest.raises(ValueError, match=fragment):
        solve(losses, densities, **kwargs)


def test_bad_rules_and_influence():
    with pytest.raises(ValueError, match=r"rules\[1\]"):
        rule_table({4: torch.zeros(1, 1, 4, 4)}, [(0, 1), (1,)])
    with pytest.raises(ValueError, match=r"influence\[4\] must be a \[layers, heads, 4, 4\]"):
        rule_table({4: torch.zeros(1, 4, 4)}, [(0, 1)])
    with pytest.raises(ValueError, match="disagree"):
        rule_table({4: torch.zeros(1, 2, 4, 4), 8: torch.zeros(1, 3, 8, 8)}, [(0, 1)])
