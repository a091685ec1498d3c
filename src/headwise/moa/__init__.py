"""MoA (Mixture of Sparse Attention, Fu et al., 2024): elastic per-head windows, influence profiling, plan search.

* :class:`MoAPlan` (:mod:`headwise.patterns.moa_plan`, re-exported here): per layer and head the rule ``S_h(N) = alpha_h + beta_h * N`` plus attention
  sinks; JSON round trip; the per-head :class:`~headwise.patterns.SinkWindow` pattern at a length.
* :class:`InfluenceProfiler` (``profile.py``): each attention value's first-order loss change when masked.
* :func:`search_plans` (``search.py``): the multi-length MILP (``scipy.optimize.milp``) over candidate rules.
* :func:`apply_plan` (``apply.py``): a model's softmax layers as ``moa`` layers running a plan, same weights.
* the ``moa`` module (:mod:`headwise.variants.moa`) runs a plan; ``headwise moa-plan`` writes one (``cli.py``).
"""

from headwise.patterns.moa_plan import MoAPlan, causal_density, span_at
from headwise.moa.apply import apply_plan
from headwise.moa.profile import InfluenceProfiler, attention_influence, attention_layers, dense_probabilities
from headwise.moa.search import (Solution, default_rules, pareto_front, rule_table, search_plans, select_plan,
                                 solution_plan, solve)

__all__ = ["MoAPlan", "span_at", "causal_density", "InfluenceProfiler", "attention_influence", "attention_layers",
           "dense_probabilities", "Solution", "default_rules", "rule_table", "solve", "pareto_front", "select_plan",
           "solution_plan", "search_plans", "apply_plan"]
