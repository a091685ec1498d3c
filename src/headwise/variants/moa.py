"""MoA: Mixture of Sparse Attention (registered as ``"moa"``).

Fu et al., 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression". Each head of
a causal language model keeps its own sliding window whose span grows with the input length,
``S_h(N) = alpha_h + beta_h * N``, plus the first ``sinks`` tokens (attention sinks). The per-head
``(alpha_h, beta_h)`` come from a plan (:class:`headwise.patterns.MoAPlan`, JSON) that ``headwise moa-plan``
searches by profiling a dense model (:mod:`headwise.moa`); this module runs one layer of it on
:func:`headwise.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Pattern, SinkWindow
from headwise.patterns.moa_plan import MoAPlan
from headwise.variants.base import Capabilities, SoftmaxAttention
from headwise.variants.registry import register

__all__ = ["MixtureOfSparseAttention", "naive_moa"]


@register("moa")
class MixtureOfSparseAttention(SoftmaxAttention):
    r"""Causal multi-head attention where head ``h`` attends a window of span ``S_h(N)`` and the sink tokens.

    .. math::

        \mathrm{head}_h = \mathrm{softmax}\big(Q_h K_{g(h)}^\top / \sqrt{d_k} + M_h\big)\, V_{g(h)},\qquad
        M_h[i, j] = 0 \text{ iff } j \le i \text{ and } (i - j < S_h(N) \text{ or } j < \text{sinks}),
        \quad S_h(N) = \alpha_h + \beta_h N

    (``-inf`` elsewhere), then the usual concatenation and output projection (the projections of
    :class:`~headwise.variants.mha.MultiHeadAttention`; ``g(h)`` the key/value head of query head ``h``). ``S_h(N)`` is floored and
    clamped to ``[1, N]`` (:func:`headwise.patterns.moa_plan.span_at`). The pattern is
    ``PerHead([SinkWindow(S_h(N), sinks)])``, rebuilt per length (cached by the engine).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; inside, q ``[B, H, N, D]``, k and v ``[B, H_kv, N, D]``.

    Args:
        dim: model width ``C``.
        heads: query heads ``H`` (must equal the plan's heads per layer).
        plan: an :class:`~headwise.patterns.MoAPlan`, a path to its JSON, or its dict; default ``None``: every head
            ``alpha = 64, beta = 0.125`` with 4 sinks (a uniform baseline, headwise's choice).
        layer: which layer of the plan this module is (default 0).
        kv_heads, head_dim, qkv_bias, out_bias, dropout, backend: as :class:`MultiHeadAttention`.
        pattern: ``None`` or :class:`~headwise.patterns.Causal` (accepted and dropped: the plan's sink + window
            masks are causal already); the plan gives the pattern.
        causal: always True (the plan's masks are causal); ``causal=False`` is an error.

    Self-attention only (no ``context``, no ``key_padding_mask``): MoA is for causal decoders (prefill).

    Example:
        >>> import torch, headwise
        >>> plan = headwise.patterns.MoAPlan(alphas=[[8, 0, 16, 4]], betas=[[0, 0.5, 0.25, 1]], sinks=2)
        >>> m = headwise.create("moa", dim=64, heads=4, plan=plan)
        >>> m(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    capabilities = Capabilities(causal="always", softmax=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2,
                      "plan": MoAPlan(alphas=[[3, 0, 4, 1]], betas=[[0, 0.5, 0.25, 1]], sinks=1)}

    @dataclass
    class Config(SoftmaxAttention.Config):
        causal: bool = True  # always True: the plan's sink + window masks are causal
        plan: MoAPlan | str | dict | None = None  # the MoA plan, a path to its JSON or its dict; None: uniform
        layer: int = 0  # index of this module's layer in the plan

        def __post_init__(self):
            super().__post_init__()
            if self.pattern is not None and not isinstance(self.pattern, Causal):
                raise ValueError(f"moa takes its per-head pattern from the plan (causal sink + window masks); pass "
                                 f"pattern=None, got pattern={self.pattern!r}")
            self.pattern = None  # Causal() is accepted: the plan's masks are causal already
            if self.causal is not True:
                raise ValueError(f"moa is causal by its plan, got causal={self.causal!r}")
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

    def build(self, cfg) -> None:
        super().build(cfg)
        self.pattern = None  # the plan gives the pattern at each length (attention_pattern)

    @property
    def plan(self) -> MoAPlan:
        return self.config.plan

    @property
    def layer(self) -> int:
        return self.config.layer

    def attention_pattern(self, n_q: int, n_kv: int) -> Pattern:
        """The per-head pattern ``PerHead([SinkWindow(S_h(N), sinks)])`` at ``N = n_q`` tokens (cached by the
        engine per pattern)."""
        return self.plan.pattern(self.layer, n_q)

    def pattern_at(self, n: int) -> Pattern:
        """The per-head pattern at ``n`` tokens (:meth:`attention_pattern` of a self-attention call)."""
        return self.attention_pattern(n, n)

    @classmethod
    def from_mha(cls, mha: SoftmaxAttention, plan: MoAPlan, layer: int = 0) -> MixtureOfSparseAttention:
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


def naive_moa(m: MixtureOfSparseAttention, x: Tensor) -> Tensor:
    """The reference of :class:`MixtureOfSparseAttention`, written from the paper: the projections, then per head
    ``h`` its span ``S_h(N) = clamp(floor(alpha_h + beta_h N), 1, N)`` computed here from the plan's numbers, one
    dense masked softmax over the ``SinkWindow`` of that span (:func:`headwise.core.reference.naive_attention`),
    the output projection. Compare in ``eval()`` mode (no output dropout)."""
    q, k, v = m.project(x)
    N = x.shape[1]
    outs = []
    for h in range(m.heads):
        a, b = m.plan.alphas[m.layer][h], m.plan.betas[m.layer][h]
        span = min(max(int(a + b * N), 1), N)
        g = h // (m.heads // m.kv_heads)
        o, _ = naive_attention(q[:, h : h + 1], k[:, g : g + 1], v[:, g : g + 1], SinkWindow(span, m.plan.sinks))
        outs.append(o)
    out = torch.cat(outs, 1).transpose(1, 2).reshape(x.shape[0], N, -1)
    return m.out_proj(out)
