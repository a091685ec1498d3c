"""MoA: Mixture of Sparse Attention (registered as ``"moa"``).

Fu et al., 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression". Each head of
a causal language model keeps its own sliding window whose span grows with the input length,
``S_h(N) = alpha_h + beta_h * N``, plus the first ``sinks`` tokens (attention sinks). The per-head
``(alpha_h, beta_h)`` come from a plan (:class:`headwise.moa.MoAPlan`, JSON) that ``headwise moa-plan`` searches
by profiling a dense model; this module runs one layer of it on :func:`headwise.attention`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from headwise.core.attention import attention
from headwise.moa.plan import MoAPlan
from headwise.patterns import Causal
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = ["MixtureOfSparseAttention", "apply_plan"]


@register("moa")
class MixtureOfSparseAttention(MultiHeadAttention):
    r"""Causal multi-head attention where head ``h`` attends a window of span ``S_h(N)`` and the sink tokens.

    .. math::

        \mathrm{head}_h = \mathrm{softmax}\big(Q_h K_{g(h)}^\top / \sqrt{d_k} + M_h\big)\, V_{g(h)},\qquad
        M_h[i, j] = 0 \text{ iff } j \le i \text{ and } (i - j < S_h(N) \text{ or } j < \text{sinks}),
        \quad S_h(N) = \alpha_h + \beta_h N

    (``-inf`` elsewhere), then the usual concatenation and output projection (:class:`MultiHeadAttention`, whose
    projections this module reuses; ``g(h)`` the key/value head of query head ``h``). ``S_h(N)`` is floored and
    clamped to ``[1, N]`` (:func:`headwise.moa.span_at`). The pattern is
    ``PerHead([SinkWindow(S_h(N), sinks)])``, rebuilt per length (cached by the engine).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; inside, q ``[B, H, N, D]``, k and v ``[B, H_kv, N, D]``.

    Args:
        dim: model width ``C``.
        heads: query heads ``H`` (must equal the plan's heads per layer).
        plan: an :class:`~headwise.moa.MoAPlan`, a path to its JSON, or its dict; default ``None``: every head
            ``alpha = 64, beta = 0.125`` with 4 sinks (a uniform baseline, headwise's choice).
        layer: which layer of the plan this module is (default 0).
        kv_heads, head_dim, qkv_bias, out_bias, dropout, backend: as :class:`MultiHeadAttention`.
        pattern: ``None`` or :class:`~headwise.patterns.Causal` (accepted and dropped: the plan's sink + window
            masks are causal already); the plan gives the pattern.

    Self-attention only (no ``context``, no ``key_padding_mask``): MoA is for causal decoders (prefill).

    Example:
        >>> import torch, headwise
        >>> plan = headwise.moa.MoAPlan(alphas=[[8, 0, 16, 4]], betas=[[0, 0.5, 0.25, 1]], sinks=2)
        >>> m = headwise.create("moa", dim=64, heads=4, plan=plan)
        >>> m(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    moa_profilable = True  # headwise.moa.InfluenceProfiler profiles it as its dense causal model

    @dataclass
    class Config(MultiHeadAttention.Config):
        plan: MoAPlan | str | dict | None = None  # the MoA plan, a path to its JSON or its dict; None: uniform
        layer: int = 0  # index of this module's layer in the plan

        def __post_init__(self):
            super().__post_init__()
            if self.pattern is not None and not isinstance(self.pattern, Causal):
                raise ValueError(f"moa takes its per-head pattern from the plan (causal sink + window masks); pass "
                                 f"pattern=None, got pattern={self.pattern!r}")
            self.pattern = None  # Causal() is accepted: the plan's masks are causal already
            if self.plan is None:  # the same uniform plan for every layer
                depth = self.layer + 1 if isinstance(self.layer, int) and not isinstance(self.layer, bool) else 1
                self.plan = MoAPlan.uniform(max(1, depth), self.heads, alpha=64, beta=0.125, sinks=4)
            elif isinstance(self.plan, (str, Path)):
                self.plan = MoAPlan.load(self.plan)
            elif isinstance(self.plan, dict):
                self.plan = MoAPlan.from_dict(self.plan)
            if not isinstance(self.plan, MoAPlan):
                raise TypeError(f"plan must be an MoAPlan, a JSON path, a dict or None, got plan={self.plan!r}")
            if self.plan.heads != self.heads:
                raise ValueError(f"the plan has {self.plan.heads} heads per layer but heads={self.heads}")
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 0 <= self.layer < self.plan.layers:
                raise ValueError(f"layer must be an int in [0, {self.plan.layers}) (the plan's layers), "
                                 f"got layer={self.layer!r}")

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        pattern: Causal | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
        plan: MoAPlan | str | dict | None = None,
        layer: int = 0,
    ):
        cfg = self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern,
                          qkv_bias=qkv_bias, out_bias=out_bias, dropout=dropout, backend=backend, plan=plan, layer=layer)
        super().__init__(dim, heads, kv_heads=kv_heads, head_dim=head_dim, qkv_bias=qkv_bias, out_bias=out_bias,
                         dropout=dropout, backend=backend)  # builds a default-plan Config, replaced below
        self.config = cfg
        self.plan, self.layer = cfg.plan, cfg.layer

    def pattern_at(self, n: int):
        """The per-head pattern at ``n`` tokens."""
        return self.plan.pattern(self.layer, n)

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """Causal MoA self-attention of ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        if context is not None or key_padding_mask is not None:
            raise ValueError("moa is causal self-attention: context and key_padding_mask are not supported")
        q, k, v = self.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        B, N = x.shape[0], x.shape[1]
        out = attention(q, k, v, self.pattern_at(N), backend=self.backend)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, H*D)
        return self.dropout(self.out_proj(out))  # (B, N, C)

    @classmethod
    def from_mha(cls, mha: MultiHeadAttention, plan: MoAPlan, layer: int = 0) -> MixtureOfSparseAttention:
        """An MoA module with the projections (copied weights) of a trained ``mha``/``gqa``/``mqa`` module."""
        c = mha.config
        m = cls(c.dim, c.heads, plan=plan, layer=layer, kv_heads=c.kv_heads, head_dim=c.head_dim,
                qkv_bias=c.qkv_bias, out_bias=c.out_bias, dropout=c.dropout, backend=c.backend)
        m.load_state_dict(mha.state_dict())
        return m.to(next(mha.parameters()).device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, kv_heads={c.kv_heads}, head_dim={c.head_dim}, layer={c.layer}, "
                f"sinks={self.plan.sinks}, alphas={list(self.plan.alphas[c.layer])}, "
                f"betas={list(self.plan.betas[c.layer])}, backend={c.backend!r}")


def apply_plan(model: nn.Module, plan: MoAPlan) -> nn.Module:
    """A copy of ``model`` whose attention layers (in the order of :func:`headwise.moa.attention_layers`) are
    :class:`MixtureOfSparseAttention` modules running ``plan`` with the same weights."""
    from headwise.moa.profile import attention_layers

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
