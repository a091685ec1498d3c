"""Mask-guided key/value sharing between two passes (registered as ``"shared_kv"``).

DiTCtrl (Cai et al., CVPR 2025; the mask-guided mutual self-attention of MasaCtrl, Cao et al., ICCV 2023) and the
per-subject isolation of IR-Diffusion ("Isolation and Reposition Attention"): the target pass's queries read the
keys and values of a reference pass, region by region. Each region is one softmax attention call
(:func:`headwise.attention` with the module's pattern and a per-batch key mask, :func:`headwise.core.padding.key_masked_attention`); the
reference is :func:`naive_region_attention` (the per-query loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.core.padding import key_masked_attention
from headwise.variants.base import Capabilities, SoftmaxAttention
from headwise.variants.registry import register

__all__ = ["SharedKVAttention", "naive_region_attention"]


@register("shared_kv")
class SharedKVAttention(SoftmaxAttention):
    r"""Mask-guided key/value sharing between two passes, from "DiTCtrl: Exploring Attention Control in
    Multi-Modal Diffusion Transformer for Tuning-Free Multi-Prompt Longer Video Generation" (Cai et al., CVPR
    2025; the mask-guided mutual self-attention of MasaCtrl, Cao et al., ICCV 2023), with the per-subject
    isolation of "Isolation and Reposition Attention" (IR-Diffusion).

    The target pass's queries read the keys and values of a *reference* pass (the same layer's hidden states in
    the other pass, projected with the same weights), region by region: a query in region ``r`` of the target
    attends only to keys in region ``r`` of the reference,

    .. math::

        o_i = \mathrm{softmax}_j\big(q_i k_j^\top / \sqrt{d} + \mathrm{mask}_{ij}\big)\, v_j,\quad
        \mathrm{mask}_{ij} = 0 \text{ if } \mathrm{region}^{tgt}_i = \mathrm{region}^{ref}_j \text{ else } -\infty

    With two regions (foreground 1 / background 0) this is DiTCtrl's ``M \odot \mathrm{Attn}(Q, K^{fg}_{ref},
    V^{fg}_{ref}) + (1 - M) \odot \mathrm{Attn}(Q, K^{bg}_{ref}, V^{bg}_{ref})``; with one label per subject it is
    IR-Diffusion's isolation (a subject reads only its own reference subject). Without regions every query
    reads every reference key (plain KV injection); without a reference it is self-attention.

    Shapes: ``x`` ``[B, N, C]`` (target pass), ``reference`` ``[B, M, C]``, ``query_regions`` ``[B, N]`` and
    ``key_regions`` ``[B, M]`` integer labels -> ``[B, N, C]``; inside, q is ``[B, H, N, D]``, k and v
    ``[B, H_kv, M, D]``.

    Args: as :class:`~headwise.variants.mha.MultiHeadAttention` (``dim``, ``heads``, ``kv_heads``, ``head_dim``,
    ``pattern``, ``causal``, ``qkv_bias``, ``out_bias``, ``dropout``, ``backend``; the projections are the layer's
    own, shared by both passes; ``pattern`` and ``causal`` apply to every attention call).

    Choices made here: a query whose region has no key in the reference falls back to self-attention over its
    own pass (``x``), rather than returning zeros. Where the region masks come from (DiTCtrl thresholds the
    cross-attention map of the subject's text token) is left to the caller. IR-Diffusion's *reposition*
    (moving the reference subject's tokens to the target subject's location before sharing) is a resampling of
    ``reference`` the caller does; it is not part of this module.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("shared_kv", dim=64, heads=4)
        >>> tgt, ref = torch.randn(1, 256, 64), torch.randn(1, 256, 64)
        >>> fg = torch.zeros(1, 256, dtype=torch.long); fg[:, 100:140] = 1    # subject tokens
        >>> m(tgt, ref, query_regions=fg, key_regions=fg).shape
        torch.Size([1, 256, 64])
    """

    capabilities = Capabilities(causal="optional", softmax=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2}

    def forward(self, x: Tensor, reference: Tensor | None = None, *, query_regions: Tensor | None = None,
                key_regions: Tensor | None = None) -> Tensor:
        """``x`` ``[B, N, C]`` reads ``reference`` ``[B, M, C]`` (itself when None), restricted to equal region
        labels when ``query_regions`` ``[B, N]`` and ``key_regions`` ``[B, M]`` are given."""
        if reference is None:
            if query_regions is not None or key_regions is not None:
                raise ValueError("query_regions/key_regions need a reference pass; got reference=None")
            return self.finish(self.attend(*self.project(x)))  # (B, N, C)
        if (query_regions is None) != (key_regions is None):
            raise ValueError("pass both query_regions [B, N] and key_regions [B, M], or neither")
        q, k, v = self.project(x, reference)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        if query_regions is None:
            return self.finish(self.attend(q, k, v))  # (B, N, C)
        B, N, M = x.shape[0], x.shape[1], reference.shape[1]
        for name, labels, axis, n in (("query_regions", query_regions, "N", N), ("key_regions", key_regions, "M", M)):
            if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool \
                    or tuple(labels.shape) != (B, n):
                got = (labels.dtype, tuple(labels.shape)) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"{name} must be an integer tensor [B, {axis}] = {[B, n]}, got {got}")
        out = q.new_zeros(q.shape)  # (B, H, N, D)
        orphan = torch.zeros(B, N, dtype=torch.bool, device=x.device)  # queries whose region has no reference key
        for r in torch.unique(query_regions).tolist():
            rows = query_regions == r  # (B, N)
            keep = key_regions == r  # (B, M)
            o = key_masked_attention(q, k, v, keep, self.pattern, self.backend)  # (B, H, N, D); zero where no key
            out = torch.where(rows[:, None, :, None], o, out)
            orphan |= rows & ~keep.any(-1, keepdim=True)
        if orphan.any():
            _, k_self, v_self = self.project(x)  # (B, H_kv, N, D)
            own = self.attend(q, k_self, v_self)  # (B, H, N, D)
            out = torch.where(orphan[:, None, :, None], own, out)
        return self.finish(out)  # (B, N, C)


def naive_region_attention(m: SharedKVAttention, x: Tensor, ref: Tensor, q_regions: Tensor,
                           k_regions: Tensor) -> Tensor:
    """Reference for :class:`SharedKVAttention` with regions, written out with ``m``'s weights: per query, softmax
    over the reference keys of its own region (its own pass's keys if there are none). No pattern, no dropout;
    ``H_kv = H`` or grouped (key/value head ``h // (H / H_kv)``)."""
    B, N, _ = x.shape
    H, H_kv, D = m.heads, m.kv_heads, m.head_dim
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    out = torch.zeros(B, H, N, D, dtype=x.dtype, device=x.device)
    for b in range(B):
        for i in range(N):
            same = k_regions[b] == q_regions[b, i]  # (M,)
            src, allowed = (ref[b], same) if same.any() else (x[b], torch.ones(N, dtype=torch.bool, device=x.device))
            k = F.linear(src, m.k_proj.weight, m.k_proj.bias).view(-1, H_kv, D).transpose(0, 1)  # (H_kv, M', D)
            v = F.linear(src, m.v_proj.weight, m.v_proj.bias).view(-1, H_kv, D).transpose(0, 1)
            k, v = k.repeat_interleave(H // H_kv, 0), v.repeat_interleave(H // H_kv, 0)  # (H, M', D)
            s = (q[b, :, i, None] @ k.transpose(-1, -2))[:, 0] / math.sqrt(D)  # (H, M')
            p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
            out[b, :, i] = (p[..., None] * v).sum(1)
    return F.linear(out.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)
