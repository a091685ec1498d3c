"""Gaussian Adaptive Attention (GAAM; Ioannides, Chadha, Elkins, 2024, "Gaussian Adaptive Attention is All You
Need: Robust Contextual Representations Across Multiple Modalities").

Registered here:

* ``"gaam"`` -- :class:`GaussianAdaptiveAttention`, multi-head GAAM: per head, a product of learnable Gaussians
  over the normalised features reweights them.
* ``"gaam_attention"`` -- :class:`GaussianDotProductAttention`, the Gaussian reweighting plugged into
  dot-product attention (the paper's grouped-query variant, GQGAAM): queries and keys are reweighted per head
  before :func:`headwise.attention`.

The reweighting is not softmax attention over token pairs, so it is written out here: :func:`naive_gaussian_weights`
(the literal product of densities, normalised) is the reference of :func:`gaussian_weights` (the same weights in
closed form, stable in low precision), and :func:`importance_factor` is the paper's Importance Factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.core.attention import attention
from headwise.patterns import Pattern
from headwise.variants.heads import _check_choice, _check_tokens, _is_number
from headwise.checks import check_positive_int
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = [
    "GaussianAdaptiveAttention",
    "GaussianDotProductAttention",
    "gaussian_weights",
    "naive_gaussian_weights",
    "importance_factor",
]

_AXES = {"features": -1, "tokens": -2}  # axis name -> dim of a [B, H, N, d] tensor


def naive_gaussian_weights(x: Tensor, mean_offsets: Tensor, scales: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    r"""GAAM weights, literally: a product of Gaussian densities normalised along ``dim`` (the reference).

    With ``mu``, ``sigma^2`` the mean and (biased) variance of ``x`` along ``dim``, per head ``h``:

    .. math::

        w = \frac{\prod_g \mathcal{N}(y_g;\, 0, c_{h,g}^2)}{\sum_{\mathrm{dim}} \prod_g \mathcal{N}(y_g;\, 0, c_{h,g}^2)},
        \qquad y_g = \frac{x - (\mu + \delta_{h,g})}{\sqrt{\sigma^2 + \epsilon}}

    Args:
        x: ``[B, H, N, d]`` features split into heads.
        mean_offsets: ``[H, G]`` learnable offsets ``delta``; scales: ``[H, G]`` learnable spreads ``c``.
        dim: ``-1`` (normalise over each token's features) or ``-2`` (over the tokens of each feature).

    Returns:
        ``[B, H, N, d]`` weights summing to 1 along ``dim``. The product underflows when the densities are small
        (many Gaussians, narrow spreads, low precision): use :func:`gaussian_weights`. The authors' code clamps
        the normaliser at ``eps``, which stops the weights summing to 1 once the densities are that small; we
        normalise exactly.
    """
    mu = x.mean(dim, keepdim=True)  # (B, H, N or 1, d or 1)
    sd = torch.sqrt(x.var(dim, unbiased=False, keepdim=True) + eps)
    density = torch.ones_like(x)
    for g in range(mean_offsets.shape[1]):
        delta = mean_offsets[:, g].view(1, -1, 1, 1)  # (1, H, 1, 1)
        c = scales[:, g].view(1, -1, 1, 1)
        y = (x - (mu + delta)) / sd  # (B, H, N, d)
        density = density * torch.exp(-(y**2) / (2 * c**2)) / torch.sqrt(2 * math.pi * c**2)
    return density / density.sum(dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def gaussian_weights(x: Tensor, mean_offsets: Tensor, scales: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    r"""The weights of :func:`naive_gaussian_weights`, computed as one Gaussian and a softmax.

    A product of Gaussians in ``u = x - mu`` is one Gaussian (the paper's ``sigma_prod``, ``mu_prod``) with
    precision ``A = sum_g 1 / c_g^2`` and mean ``m = (sum_g delta_g / c_g^2) / A``; every other factor is constant
    along ``dim`` and cancels in the normalisation, so ``w = softmax_dim(-A (u - m)^2 / (2 (sigma^2 + eps)))``:
    ``O(1)`` work per element for any number of Gaussians, and no underflow. Same shapes.
    """
    precision = (1 / scales**2).sum(1).view(1, -1, 1, 1)  # (1, H, 1, 1)  A
    centre = ((mean_offsets / scales**2).sum(1) / (1 / scales**2).sum(1)).view(1, -1, 1, 1)  # (1, H, 1, 1)  m
    mu = x.mean(dim, keepdim=True)  # (B, H, N or 1, d or 1)
    var = x.var(dim, unbiased=False, keepdim=True) + eps
    logits = -precision * (x - mu - centre) ** 2 / (2 * var)  # (B, H, N, d)
    return torch.softmax(logits, dim=dim)


def importance_factor(density: Tensor) -> Tensor:
    r"""The paper's Importance Factor: min-max normalised density attention weights,
    ``IF = (DA - min DA) / (max DA - min DA)`` over all entries of ``density`` (zeros where all are equal).

    The paper averages the weights over a validation set before normalising; the modules here store the mean
    over the batch of their last forward (``module.density``) and its IF (``module.importance_factor``).
    """
    lo, hi = density.min(), density.max()
    span = hi - lo
    return (density - lo) / span if bool(span > 0) else torch.zeros_like(density)


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
    _check_choice("axis", cfg.axis, tuple(_AXES))
    if not _is_number(cfg.c_init) or not cfg.c_init > 0:
        raise ValueError(f"c_init must be a positive number, got c_init={cfg.c_init!r}")


@register("gaam")
class GaussianAdaptiveAttention(nn.Module):
    r"""Multi-head Gaussian Adaptive Attention (GAAM; Ioannides, Chadha, Elkins, 2024).

    The channels are split into ``H`` heads of ``d = C / H``; head ``h`` reweights its features by a product of
    ``G`` Gaussians with learnable mean offsets ``delta_{h,g}`` and spreads ``c_{h,g}``, evaluated on the features
    normalised along ``axis``, and normalised along the same axis (see :func:`naive_gaussian_weights`):

    .. math::

        y_h = x_h \odot w_h,\qquad
        w_h \propto \prod_{g=1}^{G} \exp\!\Big(-\frac{(x_h - \mu - \delta_{h,g})^2}{2 c_{h,g}^2 (\sigma^2 + \epsilon)}\Big)
        \Big/ \sqrt{2\pi c_{h,g}^2}

    ``axis="features"`` (default): ``mu``, ``sigma`` over each token's ``d`` features of the head, and the weights
    sum to 1 over them. ``axis="tokens"``: over the ``N`` tokens of each feature (the paper's use on a stack of
    encoder layers; it mixes statistics across the sequence, so it is not causal).

    After each forward, ``module.density`` ``[N, C]`` is the mean weight over the batch and
    ``module.importance_factor`` ``[N, C]`` its Importance Factor (:func:`importance_factor`).

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

    def __init__(self, dim: int, heads: int, *, gaussians: int = 5, axis: str = "features", c_init: float = math.sqrt(2.0)):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, gaussians=gaussians, axis=axis, c_init=c_init)
        self.dim, self.heads = cfg.dim, cfg.heads
        self.gaussians = _GaussianMixtures(cfg.heads, cfg.gaussians, cfg.c_init)
        self.density = self.importance_factor = None

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        _check_tokens(x, self.dim)
        B, N, C = x.shape
        xh = x.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)  # (B, H, N, d)
        w = self.gaussians(xh, _AXES[self.config.axis])  # (B, H, N, d)
        with torch.no_grad():
            self.density = w.mean(0).transpose(0, 1).reshape(N, C)  # (N, C)
            self.importance_factor = importance_factor(self.density)
        return (xh * w).transpose(1, 2).reshape(B, N, C)  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, heads={c.heads}, gaussians={c.gaussians}, axis={c.axis!r}"


@register("gaam_attention")
class GaussianDotProductAttention(MultiHeadAttention):
    r"""Dot-product attention with GAAM reweighting of the queries and keys (the paper's GQGAAM: GAAM combined with
    grouped-query attention; Ioannides, Chadha, Elkins, 2024).

    :class:`MultiHeadAttention` (also GQA/MQA through ``kv_heads``) whose projected queries and/or keys (and
    optionally values) are reweighted per head by the Gaussian product of :class:`GaussianAdaptiveAttention`
    before :func:`headwise.attention`:

    .. math::

        q_h \leftarrow L\, w(q_h) \odot q_h,\quad k_g \leftarrow L\, w(k_g) \odot k_g,\qquad
        \mathrm{head}_h = \mathrm{softmax}(q_h k_{g(h)}^\top / \sqrt{D} + \mathrm{mask})\, v_{g(h)}

    ``w`` sums to 1 along ``axis`` (length ``L``: ``D`` for ``"features"``, the sequence for ``"tokens"``); the
    factor ``L`` makes flat Gaussians (``c -> inf``) the identity, so the module starts near plain attention.
    Each reweighted target has its own Gaussians per head (``H`` for q, ``H_kv`` for k and v).

    After each forward, ``module.density[t]`` ``[H_t, N, D]`` (batch-mean weights) and
    ``module.importance_factor[t]`` hold the weights of target ``t`` in ``targets``.

    Shapes: ``x`` ``[B, N, C]``, ``context`` ``[B, M, C]`` -> ``[B, N, C]``; q ``[B, H, N, D]``, k, v
    ``[B, H_kv, M, D]``.

    Args (beyond those of :class:`MultiHeadAttention`):
        gaussians: Gaussians per head; default 5.
        axis: ``"features"`` (default; per token over the head's ``D`` features, causal-safe) or ``"tokens"``.
        targets: which of q, k, v are reweighted, e.g. ``"qk"`` (default), ``"q"``, ``"qkv"``.
        c_init: initial spread of every Gaussian; default ``sqrt(2)``.

    Choices made here: the paper states GAAM's compatibility with dot-product attention and reports GQGAAM without
    equations we could check; we read it as the reweighting of the projected queries and keys, and the factor
    ``L`` is ours (without it ``q . k`` shrinks by about ``L^2`` and attention starts near uniform). No
    ``key_padding_mask``.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("gaam_attention(kv_heads=2)", dim=256, heads=8, pattern=headwise.patterns.Causal())
        >>> m(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
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

    def __init__(
        self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
        pattern: Pattern | str | None = None, qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", gaussians: int = 5, axis: str = "features", targets: str = "qk",
        c_init: float = math.sqrt(2.0),
    ):
        super().__init__(dim, heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias,
                         out_bias=out_bias, dropout=dropout, backend=backend)
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias,
            out_bias=out_bias, dropout=dropout, backend=backend, gaussians=gaussians, axis=axis, targets=targets,
            c_init=c_init,
        )
        self.gaussians = nn.ModuleDict({
            t: _GaussianMixtures(cfg.heads if t == "q" else cfg.kv_heads, cfg.gaussians, cfg.c_init)
            for t in "qkv" if t in cfg.targets
        })
        self.density: dict[str, Tensor] = {}
        self.importance_factor: dict[str, Tensor] = {}

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attend from ``x`` ``[B, N, C]`` to ``context`` ``[B, M, C]`` (``x`` itself when None); returns ``[B, N, C]``."""
        q, k, v = self.project(x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        qkv = {"q": q, "k": k, "v": v}
        B, N, _ = x.shape
        dim = _AXES[self.config.axis]
        for t, mixtures in self.gaussians.items():
            w = mixtures(qkv[t], dim)  # (B, H_t, L_t, D)
            qkv[t] = qkv[t] * (w * w.shape[dim])
            with torch.no_grad():
                self.density[t] = w.mean(0)  # (H_t, L_t, D)
                self.importance_factor[t] = importance_factor(self.density[t])
        out = attention(qkv["q"], qkv["k"], qkv["v"], self.pattern, backend=self.backend)  # (B, H, N, D)
        return self.dropout(self.out_proj(out.transpose(1, 2).reshape(B, N, -1)))  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, gaussians={c.gaussians}, axis={c.axis!r}, targets={c.targets!r}"
