"""Dynamic Mask Attention, from "Trainable Dynamic Mask Sparse Attention" (registered as ``"dma"``).

Shi et al., 2025: a per-key bias computed from the values both selects the ``w`` keys each query attends to and is
added to their scores. The functional core is :mod:`headwise.ops.dma` (the fast path
:func:`~headwise.ops.dma.dma_attention`, ``O(N (w + chunk) D)``, and the reference
:func:`~headwise.ops.dma.naive_dma_attention` in ``naive.py``); this module owns the projections and the bias. The
module's forward written out with its own weights is :func:`naive_dma`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_choice, check_positive_int
from headwise.ops.dma import dma_attention, naive_dma_attention
from headwise.variants.base import Capabilities, ProjectedAttention, identity_values, naive_projections
from headwise.variants.registry import register

__all__ = ["DynamicMaskAttention", "naive_dma", "BIAS_FORMS"]

BIAS_FORMS = ("exp", "linear")  # the forms of the dynamic bias z


@register("dma")
class DynamicMaskAttention(ProjectedAttention):
    r"""Dynamic Mask Attention from "Trainable Dynamic Mask Sparse Attention" (Shi et al., 2025).

    A content-aware bias per key, computed from the values, both selects the keys each query attends to and is
    added to their scores:

    .. math::

        z_{h,j} = \exp\big(A_h\, \mathrm{softplus}(v_j W_\Delta + b_\Delta)_h\big),\qquad
        S_i = \mathrm{top}_w\{ z_{h,j} : j \le i \},\qquad
        o_{h,i} = \sum_{j \in S_i} \mathrm{softmax}_{j \in S_i}\big(q_{h,i} \cdot k_{h,j} / \sqrt{D} + z_{h,j}\big)\, v_{h,j}

    ``v_j`` is the concatenation of token ``j``'s values over the key/value heads (``[H_kv D]``), ``W_\Delta``
    ``[H_kv D, H_kv]`` (``dt_proj``) and ``A`` ``[H_kv]`` learnable. The mask is applied before the softmax, so the
    model trains end to end: ``A`` and ``W_\Delta`` get gradients through the bias of the kept keys (the top-w
    choice itself is not differentiated). The attention is :func:`headwise.ops.dma.dma_attention`
    (``O(N (w + chunk) D)``).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]`` (self-attention); heads ``[B, H, N, D]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as
            :class:`~headwise.variants.base.ProjectedAttention` (``qkv_bias`` also sets the bias ``b_\Delta`` of
            ``dt_proj``).
        window: keys kept per query ``w`` (the authors' ``keep_window_size``, default 2048).
        causal: decoder attention (default True); False selects the same ``w`` keys for every query.
        bias_form: ``"exp"`` (default) ``z = exp(A softplus(.))`` as in the paper and the authors' reference code;
            ``"linear"`` ``z = A softplus(.)``, the form the authors' later model code uses "for numerical
            stability". Formerly ``bias``.
        chunk: query tokens per block of the causal fast path (default 512; changes speed only). Formerly
            ``block``.

    Choices made here: ``A`` is initialised from ``N(0, 0.02^2)`` as in the authors' Doge model; ties in ``z`` go
    to the lower key index; with grouped key/value heads (GQA) the query heads of a group share their key head's
    bias and selection, as in the authors' code (one ``A`` and one bias column per key/value head).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("dma(window=16)", dim=64, heads=4, kv_heads=2)
        >>> m(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    capabilities = Capabilities(causal="optional", weights="method")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "window": 3, "chunk": 2}
    aliases = {"block": "chunk", "bias": "bias_form"}

    @dataclass
    class Config(ProjectedAttention.Config):
        window: int = 2048  # keys kept per query w (top-w by the value-derived bias)
        causal: bool = True  # decoder attention: query i selects among keys j <= i
        bias_form: str = "exp"  # "exp": z = exp(A softplus(v W + b)) (paper); "linear": z = A softplus(v W + b)
        chunk: int = 512  # query tokens per block of the causal fast path (speed only)

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("window", self.window)
            check_bool("causal", self.causal)
            check_choice("bias_form", self.bias_form, BIAS_FORMS)
            check_positive_int("chunk", self.chunk)

    def build(self, cfg) -> None:
        super().build(cfg)
        self.dt_proj = nn.Linear(cfg.kv_heads * cfg.head_dim, cfg.kv_heads, bias=cfg.qkv_bias)
        self.A = nn.Parameter(torch.randn(cfg.kv_heads) * 0.02)  # (H_kv,)

    def dynamic_bias(self, v: Tensor) -> Tensor:
        """The per-key bias ``z`` ``[B, H_kv, N]`` from the values ``v`` ``[B, H_kv, N, D]``."""
        B, H_kv, N, D = v.shape
        dt = F.softplus(self.dt_proj(v.transpose(1, 2).reshape(B, N, H_kv * D)))  # (B, N, H_kv)
        z = self.A * dt
        return (z.exp() if self.config.bias_form == "exp" else z).transpose(1, 2)  # (B, H_kv, N)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.dma.dma_attention` with the bias of the values ``v``."""
        return self._attend(q, k, v, self.dynamic_bias(v))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, z: Tensor) -> Tensor:
        c = self.config
        return dma_attention(q, k, v, z, c.window, c.causal, chunk=c.chunk)  # (B, H, N, D)

    def attention_weights(self, x: Tensor) -> Tensor:
        """The attention probabilities ``[B, H, N, N]``: the attention applied to identity values, with the bias
        (and so the selection) computed from the real values."""
        q, k, v = self.project(x)
        return self._attend(q, k, identity_values(k), self.dynamic_bias(v))  # (B, H, N, M)


def naive_dma(m: DynamicMaskAttention, x: Tensor) -> Tensor:
    """The reference of :class:`DynamicMaskAttention`, written out with the module's own weights: ``F.linear``
    projections, the bias ``z = exp(A softplus(v W_\\Delta + b_\\Delta))`` (or without ``exp``), the dense DMA
    reference :func:`~headwise.ops.dma.naive_dma_attention`, output projection. ``x`` ``[B, N, C]`` ->
    ``[B, N, C]``; the output dropout is not applied (compare in ``eval()`` mode)."""
    B, N, _ = x.shape
    H, H_kv, D = m.heads, m.kv_heads, m.head_dim
    q, k, v = naive_projections(m, x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
    dt = F.softplus(F.linear(v.transpose(1, 2).reshape(B, N, H_kv * D), m.dt_proj.weight, m.dt_proj.bias))
    z = (m.A * dt).transpose(1, 2)  # (B, H_kv, N)
    z = z.exp() if m.config.bias_form == "exp" else z
    o, _ = naive_dma_attention(q, k, v, z, m.config.window, m.config.causal)  # (B, H, N, D)
    return F.linear(o.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
