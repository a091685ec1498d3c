"""Heads that put relative position into the score: ComplexFormer's complex multi-head attention (``"complex"``)
and RCMHA's relative convolutional multi-head attention (``"rcmha"``).

Each has a ``naive_*`` reference that materializes the score exactly as the paper writes it; the modules run
a faster form that the tests hold to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise import patterns
from headwise.core.attention import BACKENDS, attention
from headwise.core.checks import default_scale
from headwise.patterns import Pattern
from headwise.checks import check_bool, check_positive_int, resolve_head_dim
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = [
    "ComplexAttention",
    "polar",
    "complex_rotate",
    "naive_complex_attention",
    "RelativeConvAttention",
    "naive_rcmha_attention",
    "chunk_rcmha_attention",
    "depthwise_conv1d",
]








# ---------------------------------------------------------------------------------------------------------
# ComplexFormer: complex multi-head attention (CMHA)
# ---------------------------------------------------------------------------------------------------------


def polar(x: Tensor) -> tuple[Tensor, Tensor]:
    """Euler transform of a real ``[..., D]`` vector into ``D/2`` complex numbers ``z_j = x_j + i x_{j + D/2}``
    in polar form: ``(r, theta)`` ``[..., D/2]`` each, ``z = r e^{i theta}``. Gradients stay finite at ``z = 0``."""
    a, b = x.chunk(2, dim=-1)  # (..., D/2) real and imaginary parts
    r2 = a * a + b * b
    zero = r2 == 0
    r = torch.sqrt(torch.where(zero, torch.ones_like(r2), r2)).masked_fill(zero, 0.0)
    theta = torch.atan2(b, torch.where(zero, torch.ones_like(a), a))  # 0 at z = 0, finite gradient
    return r, theta


def complex_rotate(x: Tensor, phase_scale: Tensor, phase_shift: Tensor, freq: Tensor, positions: Tensor) -> Tensor:
    """Map ``x`` ``[B, H, N, D]`` to the real vector ``[r cos(phi), r sin(phi)]`` with
    ``phi = phase_scale * theta + phase_shift + freq * position`` (per head and complex component).

    ``phase_scale``, ``phase_shift``, ``freq``: ``[H, D/2]``; ``positions``: ``[N]``. The dot product of two
    such vectors is ``sum_j r r' cos(phi - phi')``, CMHA's score, so the attention runs on plain dot products.
    """
    r, theta = polar(x)  # (B, H, N, D/2) each
    phi = phase_scale[:, None] * theta + phase_shift[:, None] + freq[:, None] * positions[:, None].to(x.dtype)
    return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], dim=-1)  # (B, H, N, D)


def naive_complex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phase_scale: Tensor,
    phase_shift: Tensor,
    freq: Tensor,
    pattern: Pattern | None = None,
    scale: float | None = None,
) -> Tensor:
    """CMHA attention with the score materialized in polar form, as ComplexFormer writes it.

    ``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]``, ``v`` ``[B, H, M, Dv]`` -> ``[B, H, N, Dv]``:
    ``s_mn = scale * sum_j |q_mj| |k_nj| cos(Adapt_h(AS_mnj) + Delta_hj(m - n))`` with the semantic angle
    difference ``AS_mnj = theta(q_mj) - theta(k_nj)``, ``Adapt_h(a) = phase_scale_hj * a + phase_shift_hj`` and
    ``Delta_hj(p) = freq_hj * p``. Fully-masked rows give zeros.
    """
    N, M = q.shape[2], k.shape[2]
    rq, tq = polar(q)  # (B, H, N, D/2)
    rk, tk = polar(k)  # (B, H, M, D/2)
    semantic = tq[:, :, :, None, :] - tk[:, :, None, :, :]  # (B, H, N, M, D/2): AS_mn
    rel = (torch.arange(N, device=q.device)[:, None] - torch.arange(M, device=q.device)[None, :]).to(q.dtype)  # (N, M)
    angle = phase_scale[:, None, None] * semantic + phase_shift[:, None, None] + freq[:, None, None] * rel[..., None]
    s = (rq[:, :, :, None, :] * rk[:, :, None, :, :] * torch.cos(angle)).sum(-1)  # (B, H, N, M)
    s = s * default_scale(q, scale)
    if pattern is not None:
        s = s.masked_fill(~pattern.dense_mask(N, M, device=q.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully-masked rows -> 0
    return p @ v  # (B, H, N, Dv)


@register("complex")
class ComplexAttention(nn.Module):
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
    is a dot product of rotated real vectors (:func:`complex_rotate`) and the module runs
    :func:`headwise.attention` on them (any pattern, any backend). :func:`naive_complex_attention` materializes
    the polar-form score and is the reference. ``\alpha = 1, \beta = 0`` is RoPE; with ``\omega = 0`` as well,
    plain MHA.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; q, k, v ``[B, H, N, D]``; positions are token indices
    ``0..N-1`` (self-attention only).

    Args:
        dim: model width ``C``.
        heads: number of heads ``H``.
        head_dim: per-head width ``D`` (even); default ``dim // heads``.
        rope_base: base of the initial frequencies ``\omega_{hj} = base^{-2j/D}`` (default 10000).
        pattern: a :class:`headwise.patterns.Pattern` or spec string; default full attention.
        qkv_bias, out_bias: biases of the projections (default True).
        backend: :func:`headwise.attention` backend (default ``"auto"``).

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

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H
        head_dim: int | None = None  # per-head width D, even; None: dim // heads
        rope_base: float = 10000.0  # initial per-head frequencies omega_j = rope_base ** (-2j / D)
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projection
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            if self.head_dim % 2:
                raise ValueError(f"complex needs an even head_dim (pairs of channels form complex numbers), "
                                 f"got head_dim={self.head_dim}")
            base = self.rope_base
            if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
                raise ValueError(f"rope_base must be a number > 1, got rope_base={self.rope_base!r}")
            self.rope_base = float(self.rope_base)
            if isinstance(self.pattern, str):
                self.pattern = patterns.from_spec(self.pattern)
            if self.pattern is not None and not isinstance(self.pattern, Pattern):
                raise TypeError(f"pattern must be a headwise Pattern, a pattern spec string or None, "
                                f"got pattern={self.pattern!r} ({type(self.pattern).__name__})")
            if self.pattern is not None and self.pattern.heads not in (None, self.heads):
                raise ValueError(f"head-specific pattern has {self.pattern.heads} heads but heads={self.heads}")
            for name in ("qkv_bias", "out_bias"):
                check_bool(name, getattr(self, name))
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"unknown backend={self.backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))

    _check_tokens = MultiHeadAttention._check_tokens  # the same [B, N, C] input check as MHA

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        head_dim: int | None = None,
        rope_base: float = 10000.0,
        pattern: Pattern | str | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.config = cfg = self.Config(
            dim=dim, heads=heads, head_dim=head_dim, rope_base=rope_base, pattern=pattern, qkv_bias=qkv_bias,
            out_bias=out_bias, backend=backend,
        )
        self.dim, self.heads, self.head_dim = cfg.dim, cfg.heads, cfg.head_dim
        H, D = cfg.heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=cfg.qkv_bias)  # same layout as MultiHeadAttention
        self.kv_proj = nn.Linear(cfg.dim, 2 * H * D, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(H * D, cfg.dim, bias=cfg.out_bias)
        self.phase_scale = nn.Parameter(torch.ones(H, D // 2))  # alpha: Adapt's slope
        self.phase_shift = nn.Parameter(torch.zeros(H, D // 2))  # beta: Adapt's offset
        omega = cfg.rope_base ** (-torch.arange(D // 2, dtype=torch.float32) * 2 / D)  # (D/2,)
        self.freq = nn.Parameter(omega.repeat(H, 1))  # (H, D/2) per-head relative-position frequencies

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv_proj(x).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, D)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        """CMHA over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        self._check_tokens("x", x)
        B, N, _ = x.shape
        q, k, v = self._qkv(x)  # 3 x (B, H, N, D)
        pos = torch.arange(N, device=x.device)  # (N,)
        zero = torch.zeros_like(self.phase_shift)
        q = complex_rotate(q, self.phase_scale, self.phase_shift, self.freq, pos)  # (B, H, N, D)
        k = complex_rotate(k, self.phase_scale, zero, self.freq, pos)  # (B, H, N, D)
        o = attention(q, k, v, self.config.pattern, backend=self.config.backend)  # (B, H, N, D)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, C)

    def naive_forward(self, x: Tensor) -> Tensor:
        """The module through :func:`naive_complex_attention` (the polar-form reference)."""
        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        o = naive_complex_attention(q, k, v, self.phase_scale, self.phase_shift, self.freq, self.config.pattern)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, rope_base={c.rope_base}, pattern={c.pattern!r}"


# ---------------------------------------------------------------------------------------------------------
# RCMHA: relative convolutional multi-head attention
# ---------------------------------------------------------------------------------------------------------


def _conv_left(kernel_size: int, causal: bool) -> int:
    """Taps before the current token: all but one when causal, else ``(kernel_size - 1) // 2`` (as
    ``torch.nn.Conv1d(padding="same")``)."""
    return kernel_size - 1 if causal else (kernel_size - 1) // 2


def depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, causal: bool = False) -> Tensor:
    """Depthwise convolution along the sequence of ``x`` ``[B, N, C]`` with ``weight`` ``[k, C]`` (one kernel of
    ``k`` taps per channel) and ``bias`` ``[C]``; zero padding keeps ``N`` tokens: all ``k - 1`` on the left when
    ``causal``, else split as ``torch.nn.Conv1d(padding="same")``.

    ``y[n, c] = bias[c] + sum_t weight[t, c] * x[n - left + t, c]``: ``k`` fused multiply-adds on the
    token-major layout (no transposes; on CPU faster than a grouped ``conv1d`` and equal to it, see the tests).
    """
    k, N = weight.shape[0], x.shape[1]
    left = _conv_left(k, causal)
    xp = F.pad(x, (0, 0, left, k - 1 - left))  # (B, N + k - 1, C)
    y = xp[:, :N] * weight[0] if bias is None else torch.addcmul(bias, xp[:, :N], weight[0])  # (B, N, C)
    for t in range(1, k):
        y = y + xp[:, t : t + N] * weight[t]
    return y


def _relative_index(q_pos: Tensor, kv_pos: Tensor, max_distance: int) -> Tensor:
    """``[n_q, n_kv]`` indices ``clamp(i - j, -K, K) + K`` into a table of ``2K + 1`` relative positions."""
    return (q_pos[:, None] - kv_pos[None, :]).clamp(-max_distance, max_distance) + max_distance


def naive_rcmha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_query_bias: Tensor,
    rel_key: Tensor,
    rel_bias: Tensor,
    max_distance: int,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """RCMHA's relative attention with the full score materialized (Transformer-XL's four terms).

    ``s_ij = scale * ((q_i + u) . k_j + q_i . R_{c(i-j)} + S_{c(i-j)})``, ``c`` clipping ``i - j`` to
    ``[-K, K]``. ``q, k`` ``[B, H, N, D]``, ``v`` ``[B, H, N, Dv]``, ``pos_query_bias`` (``u``) ``[H, D]``,
    ``rel_key`` (``R``) ``[2K+1, H, D]``, ``rel_bias`` (``S``) ``[2K+1, H]`` -> ``[B, H, N, Dv]``.
    """
    N, M = q.shape[2], k.shape[2]
    rel = _relative_index(torch.arange(N, device=q.device), torch.arange(M, device=q.device), max_distance)  # (N, M)
    content = (q + pos_query_bias[:, None]) @ k.transpose(-1, -2)  # (B, H, N, M): terms (a) + (c)
    R = rel_key[rel]  # (N, M, H, D)
    position = torch.einsum("bhnd,nmhd->bhnm", q, R) + rel_bias[rel].permute(2, 0, 1)  # (B, H, N, M): (b) + (d)
    s = (content + position) * default_scale(q, scale)
    if causal:
        s = s.masked_fill(torch.ones(N, M, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # (B, H, N, Dv)


def chunk_rcmha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_query_bias: Tensor,
    rel_key: Tensor,
    rel_bias: Tensor,
    max_distance: int,
    causal: bool = False,
    scale: float | None = None,
    chunk: int = 512,
) -> Tensor:
    """:func:`naive_rcmha_attention` computed ``chunk`` query rows at a time.

    Per chunk, the position terms of every relative distance form a small table
    ``T = scale * (q . R_r + S_r)`` ``[B, H, chunk, 2K+1]`` (with ``-inf`` for negative distances when
    ``causal``: those keys are in the future); one ``gather`` expands it into the ``[B, H, chunk, M]`` additive
    bias and one fused ``scaled_dot_product_attention`` call applies it. Memory ``O(chunk * M)`` per call.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    s = default_scale(q, scale)
    K = max_distance
    qu = q + pos_query_bias[:, None]  # (B, H, N, D)
    kv_pos = torch.arange(M, device=q.device)
    outs = []
    for i0 in range(0, N, chunk):
        qc = q[:, :, i0 : i0 + chunk]  # (B, H, c, D)
        c = qc.shape[2]
        table = (torch.einsum("bhcd,rhd->bhcr", qc, rel_key) + rel_bias.T[:, None]) * s  # (B, H, c, 2K+1)
        if causal:
            table[..., :K] = float("-inf")  # relative distance i - j < 0
        rel = _relative_index(torch.arange(i0, i0 + c, device=q.device), kv_pos, K)  # (c, M)
        bias = torch.gather(table, -1, rel.expand(B, H, c, M))  # (B, H, c, M)
        outs.append(F.scaled_dot_product_attention(qu[:, :, i0 : i0 + c], k, v, attn_mask=bias, scale=s))
    return torch.cat(outs, dim=2)  # (B, H, N, Dv)


@register("rcmha")
class RelativeConvAttention(nn.Module):
    r"""Relative convolutional multi-head attention from "RCMHA: Relative Convolutional Multi-Head Attention for
    Natural Language Modelling" (Sugiharto, Aradea and Mubarok, 2023): MHA with (1) a depthwise convolution along
    the sequence on the projected queries, keys and values (as in Primer's Multi-DConv-Head Attention) and (2)
    Transformer-XL's relative positional encoding in the scores (as in Relative MHA).

    .. math::

        Q = \mathrm{DWConv}_q(x W^Q),\quad K = \mathrm{DWConv}_k(x W^K),\quad V = \mathrm{DWConv}_v(x W^V)

        s_{ij} = \frac{1}{\sqrt{D}}\Big((Q_i + u)\cdot K_j + Q_i \cdot R_{c(i-j)} + S_{c(i-j)}\Big),
        \qquad y = \mathrm{Concat}_h\big(\mathrm{softmax}(s)\, V\big) W^O

    per head, with learned relative-key embeddings ``R`` ``[2K+1, H, D]``, relative biases ``S`` ``[2K+1, H]``,
    the global content bias ``u`` ``[H, D]`` (Transformer-XL's terms b, d and c; term a is the content score),
    and ``c(i - j) = clamp(i - j, -K, K)`` with ``K = max_distance``. ``DWConv`` is one kernel of
    ``kernel_size`` taps per channel (:func:`depthwise_conv1d`), causal (left-padded) when ``causal=True``,
    else centred (``padding="same"``).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; q, k, v ``[B, H, N, D]``.

    Computation: the score has a query-dependent relative-position term that :func:`headwise.attention`
    does not take, so the module runs :func:`chunk_rcmha_attention` (fused ``torch`` SDPA with an additive bias,
    ``chunk`` query rows per call) and :func:`naive_rcmha_attention` is the materialized reference.

    Args:
        dim: model width ``C``.
        heads: number of heads ``H``.
        head_dim: per-head width ``D``; default ``dim // heads``.
        kernel_size: depthwise convolution taps (default 3, as in Primer).
        max_distance: relative distances are clipped to ``[-K, K]`` (default 128).
        causal: causal convolution and causal attention, for language modelling (default False).
        qkv_bias, out_bias: biases of the projections (default True).
        chunk: query rows per fused attention call (default 512; memory vs. call count).

    Choices made here: the convolution acts on the projected q, k, v (Primer's MDHA, which RCMHA names as its
    convolutional ancestor); it starts as the identity (a centred/last tap of 1, zero bias) and ``u, R, S``
    start at zero, so a fresh module computes MHA exactly; relative embeddings are learned and clipped at
    ``max_distance`` (Shaw et al.) rather than Transformer-XL's projected sinusoids without clipping.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("rcmha(causal=True)", dim=256, heads=8)
        >>> m(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H
        head_dim: int | None = None  # per-head width D; None: dim // heads
        kernel_size: int = 3  # depthwise convolution taps along the sequence
        max_distance: int = 128  # relative distances clipped to [-max_distance, max_distance]
        causal: bool = False  # causal convolution and causal attention (language modelling)
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projection
        chunk: int = 512  # query rows per fused attention call

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            for name in ("kernel_size", "max_distance", "chunk"):
                check_positive_int(name, getattr(self, name))
            for name in ("causal", "qkv_bias", "out_bias"):
                check_bool(name, getattr(self, name))

    _check_tokens = MultiHeadAttention._check_tokens  # the same [B, N, C] input check as MHA

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        head_dim: int | None = None,
        kernel_size: int = 3,
        max_distance: int = 128,
        causal: bool = False,
        qkv_bias: bool = True,
        out_bias: bool = True,
        chunk: int = 512,
    ):
        super().__init__()
        self.config = cfg = self.Config(
            dim=dim, heads=heads, head_dim=head_dim, kernel_size=kernel_size, max_distance=max_distance,
            causal=causal, qkv_bias=qkv_bias, out_bias=out_bias, chunk=chunk,
        )
        self.dim, self.heads, self.head_dim = cfg.dim, cfg.heads, cfg.head_dim
        H, D, K = cfg.heads, cfg.head_dim, cfg.max_distance
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=cfg.qkv_bias)  # same layout as MultiHeadAttention
        self.kv_proj = nn.Linear(cfg.dim, 2 * H * D, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(H * D, cfg.dim, bias=cfg.out_bias)
        # one depthwise convolution over the 3*H*D channels [q | k | v]: a kernel of kernel_size taps each
        self.conv_weight = nn.Parameter(torch.empty(cfg.kernel_size, 3 * H * D))
        self.conv_bias = nn.Parameter(torch.empty(3 * H * D))
        self.pos_query_bias = nn.Parameter(torch.zeros(H, D))  # u
        self.rel_key = nn.Parameter(torch.zeros(2 * K + 1, H, D))  # R_{-K..K}
        self.rel_bias = nn.Parameter(torch.zeros(2 * K + 1, H))  # S_{-K..K}
        self.reset_conv_to_identity()

    def reset_conv_to_identity(self) -> None:
        """Set the depthwise convolution to the identity: weight 1 on the current token's tap, 0 elsewhere."""
        ks = self.config.kernel_size
        with torch.no_grad():
            self.conv_weight.zero_()
            self.conv_weight[_conv_left(ks, self.config.causal)] = 1.0  # the tap that reads token n itself
            self.conv_bias.zero_()

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        qkv = torch.cat([self.q_proj(x), self.kv_proj(x)], dim=-1)  # (B, N, 3*H*D)
        qkv = depthwise_conv1d(qkv, self.conv_weight, self.conv_bias, causal=self.config.causal)  # (B, N, 3*H*D)
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        return q, k, v

    def _relative(self) -> tuple[Tensor, Tensor, Tensor, int]:
        return self.pos_query_bias, self.rel_key, self.rel_bias, self.config.max_distance

    def forward(self, x: Tensor) -> Tensor:
        """RCMHA over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        self._check_tokens("x", x)
        B, N, _ = x.shape
        q, k, v = self._qkv(x)  # 3 x (B, H, N, D)
        o = chunk_rcmha_attention(q, k, v, *self._relative(), causal=self.config.causal, chunk=self.config.chunk)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, C)

    def naive_forward(self, x: Tensor) -> Tensor:
        """The module through :func:`naive_rcmha_attention` (the materialized reference)."""
        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        o = naive_rcmha_attention(q, k, v, *self._relative(), causal=self.config.causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, kernel_size={c.kernel_size}, "
                f"max_distance={c.max_distance}, causal={c.causal}")
