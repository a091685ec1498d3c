"""Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across Multiple Modalities
(GAAM; Ioannides, Chadha, Elkins, 2024) (registered as ``"gaam"`` and ``"gaam_attention"``).

* ``"gaam"`` -- :class:`GaussianAdaptiveAttention`, multi-head GAAM: per head, a product of learnable Gaussians
  over the normalised features reweights them.
* ``"gaam_attention"`` -- :class:`GaussianDotProductAttention`, the Gaussian reweighting plugged into
  dot-product attention (the paper's grouped-query variant, GQGAAM): queries and keys are reweighted per head
  before :func:`headwise.attention`.

The reweighting is not softmax attention over token pairs; its functional core is :mod:`headwise.ops.gaussian`:
:func:`~headwise.ops.gaussian.gaussian_weights` (closed form, stable in low precision), its reference
:func:`~headwise.ops.gaussian.naive_gaussian_weights` (the literal product of densities, normalised) and the
paper's Importance Factor :func:`~headwise.ops.gaussian.importance_factor`. The module reference of
``gaam_attention`` is :func:`naive_gaam_attention`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_choice, check_positive_int, check_tokens, is_number
from headwise.core.reference import naive_attention
from headwise.ops.gaussian import (
    gaussian_weights,
    importance_factor,
    naive_gaussian_weights,
)
from headwise.variants.base import Capabilities, SoftmaxAttention, Variant, naive_projections
from headwise.variants.registry import register

__all__ = ["GaussianAdaptiveAttention", "GaussianDotProductAttention", "naive_gaam_attention"]

AXES = {"features": -1, "tokens": -2}  # axis name -> dim of a [B, H, N, d] tensor


class _GaussianMixtures(nn.Module):
    """Learnable offsets ``delta`` and spreads ``c`` of ``gaussians`` Gaussians for each of ``heads`` heads."""

    def __init__(self, heads: int, gaussians: int, c_init: float):
        super().__init__()
        self.mean_offsets = nn.Parameter(torch.zeros(heads, gaussians))  # delta, (H, G)
        self.scales = nn.Parameter(torch.full((heads, gaussians), float(c_init)))  # c, (H, G)

    def forward(self, x: Tensor, dim: int) -> Tensor:
        """Weights ``[B, H, N, d]`` for features ``x`` ``[B, H, N, d]``, summing to 1 along ``dim``."""
        return gaussian_weights(x, self.mean_offsets, self.scales, dim)


def _check_gaussians(cfg) -> None:
    check_positive_int("gaussians", cfg.gaussians)
    check_choice("axis", cfg.axis, tuple(AXES))
    if not is_number(cfg.c_init) or not cfg.c_init > 0:
        raise ValueError(f"c_init must be a positive number, got c_init={cfg.c_init!r}")


def no_causal_mode_over_tokens(capabilities: Capabilities, config) -> Capabilities:
    """GAAM's causality follows its axis: normalising each token's features is causal (``gaam`` by construction,
    ``gaam_attention`` with ``causal=True``); normalising over the tokens (``axis="tokens"``) has no causal mode."""
    return dataclasses.replace(capabilities, causal="none") if config.axis == "tokens" else capabilities


@register("gaam")
class GaussianAdaptiveAttention(Variant):
    r"""Multi-head Gaussian Adaptive Attention (GAAM; Ioannides, Chadha, Elkins, 2024).

    The channels are split into ``H`` heads of ``d = C / H``; head ``h`` reweights its features by a product of
    ``G`` Gaussians with learnable mean offsets ``delta_{h,g}`` and spreads ``c_{h,g}``, evaluated on the features
    normalised along ``axis``, and normalised along the same axis (see
    :func:`~headwise.ops.gaussian.naive_gaussian_weights`):

    .. math::

        y_h = x_h \odot w_h,\qquad
        w_h \propto \prod_{g=1}^{G} \exp\!\Big(-\frac{(x_h - \mu - \delta_{h,g})^2}{2 c_{h,g}^2 (\sigma^2 + \epsilon)}\Big)
        \Big/ \sqrt{2\pi c_{h,g}^2}

    ``axis="features"`` (default): ``mu``, ``sigma`` over each token's ``d`` features of the head, and the weights
    sum to 1 over them; each output token depends on its own input only (causal by construction).
    ``axis="tokens"``: over the ``N`` tokens of each feature (the paper's use on a stack of encoder layers; it
    mixes statistics across the sequence, so it is not causal).

    After each forward, ``module.density`` ``[N, C]`` is the mean weight over the batch and
    ``module.importance_factor`` ``[N, C]`` its Importance Factor (:func:`~headwise.ops.gaussian.importance_factor`).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``, inside ``[B, H, N, d]``. The paper's object is this feature
    reweighting: there are no query/key/value projections and no token pairs (``2 H G`` parameters).

    Args:
        dim: model width ``C``, a multiple of ``heads``.
        heads: number of heads ``H`` (channel splits).
        gaussians: Gaussians per head ``G``; default 5 (the authors' README example).
        axis: ``"features"`` (default) or ``"tokens"``.
        c_init: initial spread ``c`` of every Gaussian; default ``sqrt(2)`` (the paper initialises the scaled
            variance ``xi = c^2`` to 2 and the mean offsets to 0).

    Choices made here: the variance is the biased one (the paper's algorithm; the authors' package uses the
    unbiased one); offsets and spreads are one scalar per Gaussian and head (the authors' package; the paper's
    later text counts one per feature); the authors' optional padding value is not supported.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("gaam(gaussians=3)", dim=128, heads=4)
        >>> y = m(torch.randn(8, 24, 128))
        >>> m.importance_factor.shape                          # [N, C], in [0, 1]
        torch.Size([24, 128])
    """

    capabilities = Capabilities(causal="always", weights="none")  # axis="features"; see capabilities_for
    example_config = {"dim": 16, "heads": 2, "gaussians": 3}

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output; a multiple of heads
        heads: int  # number of heads H, each reweighting its own C/H channels
        gaussians: int = 5  # Gaussians G multiplied in each head
        axis: str = "features"  # normalise over each token's features ("features") or each feature's tokens ("tokens")
        c_init: float = math.sqrt(2.0)  # initial spread c of every Gaussian (xi = c^2 = 2 in the paper)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.dim % self.heads:
                raise ValueError(f"dim must be divisible by heads, got dim={self.dim} heads={self.heads}")
            _check_gaussians(self)

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        return no_causal_mode_over_tokens(cls.capabilities, config)

    def build(self, cfg) -> None:
        self.gaussians = _GaussianMixtures(cfg.heads, cfg.gaussians, cfg.c_init)
        self.density = self.importance_factor = None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        cfg = self.config
        check_tokens("x", x, cfg.dim)
        B, N, C = x.shape
        xh = x.reshape(B, N, cfg.heads, C // cfg.heads).transpose(1, 2)  # (B, H, N, d)
        w = self.gaussians(xh, AXES[cfg.axis])  # (B, H, N, d)
        with torch.no_grad():
            self.density = w.mean(0).transpose(0, 1).reshape(N, C)  # (N, C)
            self.importance_factor = importance_factor(self.density)
        return (xh * w).transpose(1, 2).reshape(B, N, C)  # (B, N, C)


@register("gaam_attention")
class GaussianDotProductAttention(SoftmaxAttention):
    r"""Dot-product attention with GAAM reweighting of the queries and keys (the paper's GQGAAM: GAAM combined with
    grouped-query attention; Ioannides, Chadha, Elkins, 2024).

    Softmax attention (also GQA/MQA through ``kv_heads``) whose projected queries and/or keys (and optionally
    values) are reweighted per head by the Gaussian product of :class:`GaussianAdaptiveAttention` before
    :func:`headwise.attention`:

    .. math::

        q_h \leftarrow L\, w(q_h) \odot q_h,\quad k_g \leftarrow L\, w(k_g) \odot k_g,\qquad
        \mathrm{head}_h = \mathrm{softmax}(q_h k_{g(h)}^\top / \sqrt{D} + \mathrm{mask})\, v_{g(h)}

    ``w`` sums to 1 along ``axis`` (length ``L``: ``D`` for ``"features"``, the sequence for ``"tokens"``); the
    factor ``L`` makes flat Gaussians (``c -> inf``) the identity, so the module starts near plain attention.
    Each reweighted target has its own Gaussians per head (``H`` for q, ``H_kv`` for k and v). The module
    reference is :func:`naive_gaam_attention`.

    After each forward, ``module.density[t]`` ``[H_t, N, D]`` (batch-mean weights) and
    ``module.importance_factor[t]`` hold the weights of target ``t`` in ``targets``.

    Shapes: ``x`` ``[B, N, C]``, ``context`` ``[B, M, C]`` -> ``[B, N, C]``; q ``[B, H, N, D]``, k, v
    ``[B, H_kv, M, D]``.

    Args (beyond those of :class:`~headwise.variants.base.SoftmaxAttention`: dim, heads, kv_heads, head_dim,
    qkv_bias, out_bias, dropout, pattern, causal, backend):
        gaussians: Gaussians per head; default 5.
        axis: ``"features"`` (default; per token over the head's ``D`` features, causal-safe) or ``"tokens"``
            (over the sequence: no causal mode, ``causal=True`` raises).
        targets: which of q, k, v are reweighted, e.g. ``"qk"`` (default), ``"q"``, ``"qkv"``.
        c_init: initial spread of every Gaussian; default ``sqrt(2)``.

    Choices made here: the paper states GAAM's compatibility with dot-product attention and reports GQGAAM without
    equations we could check; we read it as the reweighting of the projected queries and keys, and the factor
    ``L`` is ours (without it ``q . k`` shrinks by about ``L^2`` and attention starts near uniform). No
    ``key_padding_mask``.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("gaam_attention(kv_heads=2)", dim=256, heads=8, causal=True)
        >>> m(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    capabilities = Capabilities(causal="optional", context=True)  # axis="features"; see capabilities_for
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "gaussians": 2}

    @dataclass
    class Config(SoftmaxAttention.Config):
        gaussians: int = 5  # Gaussians G multiplied in each head
        axis: str = "features"  # normalise over each token's head features ("features") or each feature's tokens ("tokens")
        targets: str = "qk"  # which projections are reweighted: any non-empty combination of "q", "k", "v"
        c_init: float = math.sqrt(2.0)  # initial spread c of every Gaussian (xi = c^2 = 2 in the paper)

        def __post_init__(self):
            super().__post_init__()
            _check_gaussians(self)
            if not isinstance(self.targets, str) or not self.targets or set(self.targets) - set("qkv") \
                    or len(set(self.targets)) != len(self.targets):
                raise ValueError(f"targets must be a non-empty combination of 'q', 'k', 'v' without repeats, "
                                 f"got targets={self.targets!r}")
            if self.causal and self.axis == "tokens":
                raise ValueError("axis='tokens' normalises over the whole sequence, so causal=True would still see "
                                 "future tokens; use axis='features' for causal attention")

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        return no_causal_mode_over_tokens(cls.capabilities, config)

    def build(self, cfg) -> None:
        super().build(cfg)
        self.gaussians = nn.ModuleDict({
            t: _GaussianMixtures(cfg.heads if t == "q" else cfg.kv_heads, cfg.gaussians, cfg.c_init)
            for t in "qkv" if t in cfg.targets
        })
        self.density: dict[str, Tensor] = {}
        self.importance_factor: dict[str, Tensor] = {}

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attend from ``x`` ``[B, N, C]`` to ``context`` ``[B, M, C]`` (``x`` itself when None); returns ``[B, N, C]``."""
        return self.finish(self.attend(*self.project(x, context)))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Reweight the targets among ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, M, D]`` (recording their
        density and Importance Factor), then softmax attention with the module's pattern -> ``[B, H, N, D]``."""
        qkv = {"q": q, "k": k, "v": v}
        dim = AXES[self.config.axis]
        for t, mixtures in self.gaussians.items():
            w = mixtures(qkv[t], dim)  # (B, H_t, L_t, D)
            qkv[t] = qkv[t] * (w * w.shape[dim])
            with torch.no_grad():
                self.density[t] = w.mean(0)  # (H_t, L_t, D)
                self.importance_factor[t] = importance_factor(self.density[t])
        return super().attend(qkv["q"], qkv["k"], qkv["v"])  # (B, H, N, D)


def naive_gaam_attention(m: GaussianDotProductAttention, x: Tensor) -> Tensor:
    """The reference of :class:`GaussianDotProductAttention` (self-attention), written out with its weights:
    ``F.linear`` projections, the literal Gaussian weights (:func:`~headwise.ops.gaussian.naive_gaussian_weights`,
    times the axis length) on each target, materialized attention under the module's pattern
    (:func:`headwise.core.reference.naive_attention`), output projection. No dropout."""
    B, N, _ = x.shape
    H, D = m.heads, m.head_dim
    t = dict(zip("qkv", naive_projections(m, x)))  # q (B, H, N, D), k, v (B, H_kv, N, D)
    dim = AXES[m.config.axis]
    for name, g in m.gaussians.items():
        t[name] = t[name] * naive_gaussian_weights(t[name], g.mean_offsets, g.scales, dim) * t[name].shape[dim]
    o = naive_attention(t["q"], t["k"], t["v"], m.pattern)[0]  # (B, H, N, D)
    return F.linear(o.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
