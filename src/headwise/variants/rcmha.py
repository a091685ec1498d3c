"""RCMHA, relative convolutional multi-head attention (registered as ``"rcmha"``).

Sugiharto, Aradea and Mubarok, 2023, "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language
Modelling": a depthwise convolution along the sequence on the projected queries, keys and values
(:func:`depthwise_conv1d`) and Transformer-XL's relative positional terms in the score. The functional core is
:mod:`headwise.ops.rcmha` (:func:`~headwise.ops.rcmha.chunk_rcmha_attention`, fused SDPA with an additive bias
per chunk of queries; the materialized reference in ``naive.py``); :func:`naive_rcmha` is the module's reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_positive_int, check_tokens
from headwise.ops.rcmha import chunk_rcmha_attention, naive_rcmha_attention
from headwise.variants.base import Capabilities, ProjectedAttention
from headwise.variants.registry import register

__all__ = ["RelativeConvAttention", "naive_rcmha", "depthwise_conv1d"]


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

    Example:
        >>> import torch
        >>> x = torch.arange(4.0).view(1, 4, 1)                        # one channel: 0, 1, 2, 3
        >>> depthwise_conv1d(x, torch.tensor([[1.0], [10.0]]), causal=True).flatten()   # x[n-1] + 10 x[n]
        tensor([ 0., 10., 21., 32.])
    """
    k, N = weight.shape[0], x.shape[1]
    left = _conv_left(k, causal)
    xp = F.pad(x, (0, 0, left, k - 1 - left))  # (B, N + k - 1, C)
    y = xp[:, :N] * weight[0] if bias is None else torch.addcmul(bias, xp[:, :N], weight[0])  # (B, N, C)
    for t in range(1, k):
        y = y + xp[:, t : t + N] * weight[t]
    return y


@register("rcmha")
class RelativeConvAttention(ProjectedAttention):
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

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; q, k, v ``[B, H, N, D]``. Weights: ``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj`` as in MHA; ``conv_weight`` ``[kernel_size, 3*H*D]`` and ``conv_bias`` ``[3*H*D]``
    over the channels ``[q | k | v]``; ``pos_query_bias`` (``u``), ``rel_key`` (``R``), ``rel_bias`` (``S``).

    Computation: the score has a query-dependent relative-position term that :func:`headwise.attention`
    does not take, so the module runs :func:`~headwise.ops.rcmha.chunk_rcmha_attention` (fused ``torch`` SDPA
    with an additive bias, ``chunk`` query rows per call) and
    :func:`~headwise.ops.rcmha.naive_rcmha_attention` is the materialized reference. :meth:`project` includes
    the convolution, so :meth:`attention_weights` (the attention step on identity values) is the attention
    matrix.

    Args (the fields of :class:`RelativeConvAttention.Config`, besides the projections' ``dim``, ``heads``,
    ``head_dim``, ``qkv_bias``, ``out_bias``, ``dropout``; ``kv_heads`` must equal ``heads``):
        kernel_size: depthwise convolution taps (default 3, as in Primer).
        max_distance: relative distances are clipped to ``[-K, K]`` (default 128).
        causal: causal convolution and causal attention, for language modelling (default False).
        chunk: query rows per fused attention call (default 512; memory vs. call count, same result).

    Choices made here: the convolution acts on the projected q, k, v (Primer's MDHA, which RCMHA names as its
    convolutional ancestor); it starts as the identity (a centred/last tap of 1, zero bias) and ``u, R, S``
    start at zero, so a fresh module computes MHA exactly; relative embeddings are learned and clipped at
    ``max_distance`` (Shaw et al.) rather than Transformer-XL's projected sinusoids without clipping.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("rcmha(causal=True, max_distance=32)", dim=128, heads=4)
        >>> m(torch.randn(2, 100, 128)).shape
        torch.Size([2, 100, 128])
    """

    capabilities = Capabilities(causal="optional", weights="method")
    example_config = {"dim": 16, "heads": 2, "kernel_size": 3, "max_distance": 4, "chunk": 4}

    @dataclass
    class Config(ProjectedAttention.Config):
        kernel_size: int = 3  # depthwise convolution taps along the sequence
        max_distance: int = 128  # relative distances clipped to [-max_distance, max_distance]
        causal: bool = False  # causal convolution and causal attention (language modelling)
        chunk: int = 512  # query rows per fused attention call (speed only, same result)

        def __post_init__(self):
            super().__post_init__()
            if self.kv_heads != self.heads:
                raise ValueError(f"rcmha has one key/value head per query head, got kv_heads={self.kv_heads} "
                                 f"heads={self.heads}")
            for name in ("kernel_size", "max_distance", "chunk"):
                check_positive_int(name, getattr(self, name))
            check_bool("causal", self.causal)

    def build(self, cfg) -> None:
        super().build(cfg)
        H, D, K = cfg.heads, cfg.head_dim, cfg.max_distance
        # one depthwise convolution over the 3*H*D channels [q | k | v]: a kernel of kernel_size taps each
        self.conv_weight = nn.Parameter(torch.empty(cfg.kernel_size, 3 * H * D))
        self.conv_bias = nn.Parameter(torch.empty(3 * H * D))
        self.pos_query_bias = nn.Parameter(torch.zeros(H, D))  # u
        self.rel_key = nn.Parameter(torch.zeros(2 * K + 1, H, D))  # R_{-K..K}
        self.rel_bias = nn.Parameter(torch.zeros(2 * K + 1, H))  # S_{-K..K}
        self.reset_conv_to_identity()

    def reset_conv_to_identity(self) -> None:
        """Set the depthwise convolution to the identity: weight 1 on the current token's tap, 0 elsewhere."""
        with torch.no_grad():
            self.conv_weight.zero_()
            self.conv_weight[_conv_left(self.config.kernel_size, self.config.causal)] = 1.0  # reads token n itself
            self.conv_bias.zero_()

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B, N, C]`` -> convolved ``q``, ``k``, ``v`` ``[B, H, N, D]`` (projections, then the depthwise
        convolution along the sequence)."""
        check_tokens("x", x, self.dim)
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (B, N, 3*H*D)
        qkv = depthwise_conv1d(qkv, self.conv_weight, self.conv_bias, causal=self.config.causal)  # (B, N, 3*H*D)
        q, k, v = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.rcmha.chunk_rcmha_attention` with this module's relative terms."""
        c = self.config
        return chunk_rcmha_attention(q, k, v, self.pos_query_bias, self.rel_key, self.rel_bias, c.max_distance,
                                     causal=c.causal, chunk=c.chunk)


def naive_rcmha(m: RelativeConvAttention, x: Tensor) -> Tensor:
    """Reference of :class:`RelativeConvAttention`, written out with the module's own weights: ``F.linear``
    projections, the depthwise convolution as a grouped ``F.conv1d`` (zero padding: ``kernel_size - 1`` taps
    before when causal, centred otherwise), :func:`~headwise.ops.rcmha.naive_rcmha_attention` (the materialized
    score), output projection. ``x`` ``[B, N, C]`` -> ``[B, N, C]``; the output dropout is not applied."""
    cfg = m.config
    B, N, _ = x.shape
    H, D, ks = cfg.heads, cfg.head_dim, cfg.kernel_size
    qkv = torch.cat([F.linear(x, p.weight, p.bias) for p in (m.q_proj, m.k_proj, m.v_proj)], dim=-1)  # (B, N, 3HD)
    left = _conv_left(ks, cfg.causal)
    qkv = F.conv1d(F.pad(qkv.transpose(1, 2), (left, ks - 1 - left)), m.conv_weight.T[:, None], m.conv_bias,
                   groups=3 * H * D).transpose(1, 2)  # (B, N, 3*H*D)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, D)
    o = naive_rcmha_attention(q, k, v, m.pos_query_bias, m.rel_key, m.rel_bias, cfg.max_distance, causal=cfg.causal)
    return F.linear(o.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
