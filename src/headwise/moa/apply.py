"""Turn a model's softmax attention layers into MoA layers running a plan (same weights)."""

from __future__ import annotations

import copy

from torch import nn

from headwise.moa.profile import attention_layers
from headwise.patterns.moa_plan import MoAPlan
from headwise.variants.moa import MixtureOfSparseAttention

__all__ = ["apply_plan"]


def apply_plan(model: nn.Module, plan: MoAPlan) -> nn.Module:
    """A copy of ``model`` whose attention layers (in the order of :func:`headwise.moa.attention_layers`) are
    :class:`MixtureOfSparseAttention` modules running ``plan`` with the same weights."""
    if not isinstance(plan, MoAPlan):
        raise TypeError(f"plan must be an MoAPlan, got {type(plan).__name__}")
    model = copy.deepcopy(model)
    layers = attention_layers(model)
    if len(layers) != plan.layers:
        raise ValueError(f"the plan has {plan.layers} layers but the model has {len(layers)} attention layers")
    names = {id(m): name for name, m in model.named_modules()}
    for i, m in enumerate(layers):
        new = MixtureOfSparseAttention.from_mha(m, plan, i)
        name = names[id(m)]
        if name == "":
            return new
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    return model
