"""ComplexFormer's complex multi-head attention (registered as ``"complex"``).

Shao et al., 2025, "ComplexFormer: Disruptively Advancing Transformer Inference Ability via Head-Specific Complex
Vector Attention": each head's queries and keys become complex numbers in polar form, and the score is the real
part of their product turned by a learned per-head map of the angle difference plus a relative-position phase.
The functional core is :mod:`headwise.ops.complex` (the rotation form :func:`~headwise.ops.complex.complex_attention`
on :func:`headwise.attention`; the polar-form reference in ``naive.py``); :func:`naive_complex` is the module's
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_number
from headwise.ops.complex import complex_attention, naive_complex_attention
from headwise.variants.base import Capabilities, SoftmaxAttention
from headwise.variants.registry import register

__all__ = ["ComplexAttention", "naive_complex"]


@register("complex")
class ComplexAttention(SoftmaxAttention):
    r"""Complex multi-head attention (CMHA) from "ComplexFormer: Disruptively Advancing Transformer Inference
    Ability via Head-Specific Complex Vector Attention" (Shao et al., 2025).

    1. Per-head Euler transform: each head's real query/key ``[D]`` becomes ``D/2`` complex numbers in polar
       form, ``q_{mj} = |q_{mj}| e^{i\theta^q_{mj}}`` (component ``j`` pairs channels ``j`` and ``j + D/2``).
    2. Per-head adaptive differential rotation: the score of query ``m`` and key ``n`` in head ``h`` is

    .. math::

        s_{mn} = \frac{1}{\sqrt{D}} \sum_{j} |q_{mj}|\,|k_{nj}|\,
                 \cos\!\big(\mathrm{Adapt}_h(AS_{mn,j}) + \Delta_{h,j}(m - n)\big),
        \qquad AS_{mn,j} = \theta^q_{mj} - \theta^k_{nj}

    i.e. ``Re(q \bar{k} e^{i(\mathrm{Adapt}(AS) + \Delta(P))})`` per component, with learnable per-head
    ``\mathrm{Adapt}_h(a) = \alpha_{hj} a + \beta_{hj}`` (``phase_scale``, ``phase_shift``; init 1, 0) and
    ``\Delta_{h,j}(p) = \omega_{hj} p`` (``freq``, init to RoPE's ``base^{-2j/D}`` in every head). Values and the
    output projection are those of MHA: ``y = \mathrm{Concat}_h(\mathrm{softmax}(s) V_h) W^O``.

    Because ``Adapt`` is affine, ``\cos(\alpha(\theta^q - \theta^k) + \beta + \omega(m - n))`` splits into a
    query phase ``\alpha\theta^q + \beta + \omega m`` minus a key phase ``\alpha\theta^k + \omega n``, so the score
    is a dot product of rotated real vectors (:func:`~headwise.ops.complex.complex_rotate`) and the module runs
    :func:`headwise.attention` on them (any pattern, any backend, ``causal=True``):
    :func:`~headwise.ops.complex.complex_attention`. :func:`~headwise.ops.complex.naive_complex_attention`
    materializes the polar-form score and is the reference. ``\alpha = 1, \beta = 0`` is RoPE; with
    ``\omega = 0`` as well, plain MHA.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; q, k, v ``[B, H, N, D]``; positions are token indices
    ``0..N-1`` (self-attention only). Weights: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` as in MHA, and
    ``phase_scale``, ``phase_shift``, ``freq`` ``[H, D/2]``.

    Args (the fields of :class:`ComplexAttention.Config`, besides MHA's ``dim``, ``heads``, ``head_dim``,
    ``qkv_bias``, ``out_bias``, ``dropout``, ``pattern``, ``causal``, ``backend``):
        rope_base: base of the initial frequencies ``\omega_{hj} = base^{-2j/D}`` (default 10000).

    ``head_dim`` must be even; ``kv_heads`` must equal ``heads`` (the key rotation is per query head).

    Choices made here (the paper is withdrawn and its code unpublished; the abstract fixes only the form
    ``\exp[i(\mathrm{Adapt}(AS_{mn,i}) + \Delta(P_{mn}),i)]``): ``Adapt`` is a per-head, per-component affine
    map of the angle difference (a non-linear ``Adapt`` would force a materialized ``[N, M]`` score); ``\Delta``
    is linear in the relative position with learnable per-head frequencies; the real part of the rotated
    product is the score; values stay real.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("complex", dim=256, heads=8)
        >>> m(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    capabilities = Capabilities(causal="optional")
    example_config = {"dim": 16, "heads": 2}

    @dataclass
    class Config(SoftmaxAttention.Config):
        rope_base: float = 10000.0  # initial per-head frequencies omega_j = rope_base ** (-2j / D)

        def __post_init__(self):
            super().__post_init__()
            if self.kv_heads != self.heads:
                raise ValueError(f"complex rotates every key per query head, so kv_heads must equal heads, got "
                                 f"kv_heads={self.kv_heads} heads={self.heads}")
            if self.head_dim % 2:
                raise ValueError(f"complex needs an even head_dim (pairs of channels form complex numbers), "
                                 f"got head_dim={self.head_dim}")
            self.rope_base = check_number("rope_base", self.rope_base, 1, low_open=True)

    def build(self, cfg) -> None:
        super().build(cfg)
        H, D = cfg.heads, cfg.head_dim
        self.phase_scale = nn.Parameter(torch.ones(H, D // 2))  # alpha: Adapt's slope
        self.phase_shift = nn.Parameter(torch.zeros(H, D // 2))  # beta: Adapt's offset
        omega = cfg.rope_base ** (-torch.arange(D // 2, dtype=torch.float32) * 2 / D)  # (D/2,)
        self.freq = nn.Parameter(omega.repeat(H, 1))  # (H, D/2) per-head relative-position frequencies

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.complex.complex_attention` with this module's phases and pattern."""
        return complex_attention(q, k, v, self.phase_scale, self.phase_shift, self.freq,
                                 self.attention_pattern(q.shape[2], k.shape[2]), backend=self.backend)


def naive_complex(m: ComplexAttention, x: Tensor) -> Tensor:
    """Reference of :class:`ComplexAttention`, written out with the module's own weights: ``F.linear``
    projections, :func:`~headwise.ops.complex.naive_complex_attention` (the polar-form score) with the module's
    pattern, output projection. ``x`` ``[B, N, C]`` -> ``[B, N, C]``; the output dropout is not applied."""
    B, N, _ = x.shape
    H, D = m.heads, m.head_dim
    q, k, v = (F.linear(x, p.weight, p.bias).view(B, N, H, D).transpose(1, 2)
               for p in (m.q_proj, m.k_proj, m.v_proj))  # 3 x (B, H, N, D)
    o = naive_complex_attention(q, k, v, m.phase_scale, m.phase_shift, m.freq, m.attention_pattern(N, N))
    return F.linear(o.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
