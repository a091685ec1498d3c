"""ARBEx's window cross-attention from landmark queries to image windows (registered as ``"window_cross"``), and
its reliability balancing (:func:`reliability_balance`).

Wasi et al., 2023, "ARBEx: Attentive Feature Extraction with Reliability Balancing for Robust Facial Expression
Learning", using the window cross-attention of its POSTER++ feature extractor (Mao et al., 2023): the landmark map
queries every non-overlapping window of the image map, with a Swin-style relative-position bias
(:func:`relative_position_index`). The attention is one :func:`headwise.attention` call over all windows, the bias
folded into the dot product; the reference is :func:`naive_window_cross_attention` (a loop over windows with
materialized scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_positive_int
from headwise.core.attention import attention
from headwise.variants.base import Capabilities, Variant, check_backend, fused_projections, split_kv_proj
from headwise.variants.registry import register

__all__ = ["WindowCrossAttention", "naive_window_cross_attention", "relative_position_index", "reliability_balance"]


def relative_position_index(window: int) -> Tensor:
    """``[w*w, w*w]`` index into a ``(2w-1)^2`` table of the relative offset ``(di, dj)`` between two positions of a
    ``w x w`` window (the Swin Transformer's relative position index)."""
    ij = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack(ij).flatten(1)  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, w*w, w*w) in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]  # (w*w, w*w)


@register("window_cross")
class WindowCrossAttention(Variant):
    r"""Window-based cross-attention from landmark queries to image windows, as used by "ARBEx: Attentive Feature
    Extraction with Reliability Balancing for Robust Facial Expression Learning" (Wasi et al., 2023) in its
    POSTER++ feature extractor (Mao et al., 2023).

    The image feature map is split into non-overlapping ``w x w`` windows; the landmark feature map, one window
    in size, supplies the same queries to every window; keys and values come from the (layer-normalized) window
    tokens, and a learned relative-position bias (Swin's ``(2w-1)^2``-entry table per head) is added to the
    scores:

    .. math::

        o^{(u)} = \mathrm{softmax}\big(Q\, {K^{(u)}}^\top / \sqrt{d} + B\big)\, V^{(u)}\, W^O,\qquad
        K^{(u)} = \mathrm{LN}(X^{(u)})\, W^K,\; V^{(u)} = \mathrm{LN}(X^{(u)})\, W^V

    for every window ``u``; the window outputs are put back in place. ``Q`` is the landmark map's tokens split
    into heads, without a projection (as in the authors' code).

    Shapes: ``x`` ``[B, C, H, W]`` (image features, ``H, W`` multiples of ``window``), ``queries``
    ``[B, C, w, w]`` (landmark features) -> ``[B, C, H, W]``; inside, q, k, v are ``[B * nW, heads, w^2, D]``.

    Args:
        dim: channels ``C``.
        heads: heads ``H`` (``dim % heads == 0``).
        window: window side ``w`` (default 7).
        backend: :func:`headwise.attention` backend.

    Choices made here: :func:`headwise.attention` has no additive score bias, so the bias is folded into the
    dot product exactly: queries get a one-hot block ``e_i / scale`` and keys the bias column ``B[:, j]``
    (``w^2`` extra dimensions per head). ``W^K`` and ``W^V`` are ``k_proj`` and ``v_proj`` (``C -> C``, with
    bias), ``W^O`` is ``out_proj``. ARBEx's residual, feed-forward and the ViT after it are left to the caller; its
    reliability balancing is :func:`reliability_balance`. The landmark ``queries`` are a required second input,
    so the module is not a self-attention mixer.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("window_cross(window=7)", dim=64, heads=4)
        >>> m(torch.randn(2, 64, 14, 14), torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 14, 14])
    """

    capabilities = Capabilities(layout="image", inputs=("queries",))
    example_config = {"dim": 8, "heads": 2, "window": 3}

    @dataclass
    class Config:
        dim: int  # channels C of the image and landmark feature maps
        heads: int  # attention heads H, dim % heads == 0
        window: int = 7  # window side w; the landmark map is w x w
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            check_positive_int("window", self.window)
            if self.dim % self.heads:
                raise ValueError(f"dim must be divisible by heads, got dim={self.dim} heads={self.heads}")
            check_backend(self.backend)

    def build(self, cfg) -> None:
        w, C = cfg.window, cfg.dim
        self._register_load_state_dict_pre_hook(split_kv_proj, with_module=True)
        self.norm = nn.LayerNorm(C)
        self.k_proj, self.v_proj = fused_projections(C, [C, C])  # the initial weights of the former fused kv_proj
        self.out_proj = nn.Linear(C, C)
        self.bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, cfg.heads) * 0.02)  # ((2w-1)^2, H)
        self.register_buffer("relative_index", relative_position_index(w), persistent=False)  # (w*w, w*w)

    def example(self, batch: int = 2, *, generator: torch.Generator | None = None) -> tuple:
        """An image map ``[B, C, w, 2w]`` (two windows) and landmark queries ``[B, C, w, w]``."""
        C, w = self.config.dim, self.config.window
        return (self.example_randn(batch, C, w, 2 * w, generator=generator),
                self.example_randn(batch, C, w, w, generator=generator))

    def forward(self, x: Tensor, queries: Tensor) -> Tensor:
        """Image features ``x`` ``[B, C, H, W]`` attended by landmark ``queries`` ``[B, C, w, w]`` in every window."""
        cfg = self.config
        w, Hh, C = cfg.window, cfg.heads, cfg.dim
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != C or x.shape[2] % w or x.shape[3] % w:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, C, H, W] with C = dim = {C} and H, W multiples of window={w}, got {got}")
        B, _, H, W = x.shape
        if not isinstance(queries, Tensor) or tuple(queries.shape) != (B, C, w, w):
            got = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
            raise ValueError(f"queries must be [B, C, w, w] = {[B, C, w, w]}, got {got}")
        D, L, nh, nw = C // Hh, w * w, H // w, W // w
        t = self.norm(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        win = t.view(B, nh, w, nw, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, L, C)  # (B*nW, L, C)
        k = self.k_proj(win).view(-1, L, Hh, D).transpose(1, 2)  # (B*nW, Hh, L, D)
        v = self.v_proj(win).view(-1, L, Hh, D).transpose(1, 2)  # (B*nW, Hh, L, D)
        q = queries.flatten(2).transpose(1, 2).reshape(B, L, Hh, D).transpose(1, 2)  # (B, Hh, L, D)
        q = q.repeat_interleave(nh * nw, dim=0)  # (B*nW, Hh, L, D): the same queries for every window
        # fold the relative-position bias into the dot product: [q, e_i / s] . [k, bias[:, i, j]] * s = s q.k + bias
        scale = D ** -0.5
        bias = self.bias_table[self.relative_index].permute(2, 1, 0)  # (Hh, L_key, L_query): column j is bias[h, :, j]
        eye = torch.eye(L, dtype=q.dtype, device=q.device) / scale  # (L, L)
        q = torch.cat([q, eye.expand(q.shape[0], Hh, L, L)], dim=-1)  # (B*nW, Hh, L, D+L)
        k = torch.cat([k, bias.to(k.dtype).expand(k.shape[0], Hh, L, L)], dim=-1)  # (B*nW, Hh, L, D+L)
        o = attention(q, k, v, scale=scale, backend=cfg.backend)  # (B*nW, Hh, L, D)
        o = self.out_proj(o.transpose(1, 2).reshape(-1, L, C))  # (B*nW, L, C)
        o = o.view(B, nh, nw, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)  # (B, H, W, C)
        return o.permute(0, 3, 1, 2)  # (B, C, H, W)


def naive_window_cross_attention(m: WindowCrossAttention, x: Tensor, queries: Tensor) -> Tensor:
    """Reference for :class:`WindowCrossAttention`: explicit loops over windows, materialized scores + bias."""
    B, C, H, W = x.shape
    w, Hh = m.config.window, m.config.heads
    D = C // Hh
    t = F.layer_norm(x.permute(0, 2, 3, 1), (C,), m.norm.weight, m.norm.bias)  # (B, H, W, C)
    q = queries.flatten(2).transpose(1, 2).reshape(B, w * w, Hh, D).transpose(1, 2)  # (B, Hh, w*w, D)
    bias = m.bias_table[m.relative_index].permute(2, 0, 1)  # (Hh, w*w, w*w)
    out = torch.zeros(B, H, W, C, dtype=x.dtype, device=x.device)
    for i in range(0, H, w):
        for j in range(0, W, w):
            win = t[:, i:i + w, j:j + w].reshape(B, w * w, C)  # (B, w*w, C)
            k = F.linear(win, m.k_proj.weight, m.k_proj.bias).view(B, w * w, Hh, D).transpose(1, 2)  # (B, Hh, w*w, D)
            v = F.linear(win, m.v_proj.weight, m.v_proj.bias).view(B, w * w, Hh, D).transpose(1, 2)
            s = q @ k.transpose(-1, -2) * D ** -0.5 + bias  # (B, Hh, w*w, w*w)
            o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, w * w, C)  # (B, w*w, C)
            out[:, i:i + w, j:j + w] = F.linear(o, m.out_proj.weight, m.out_proj.bias).view(B, w, w, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


def reliability_balance(logits: Tensor, anchor_similarity: Tensor, attention_distribution: Tensor, trust: float,
                        *, temperature: float = 1.0) -> Tensor:
    r"""ARBEx's reliability balancing of a label distribution (Wasi et al., 2023).

    With ``p = softmax(logits / T)`` and confidence ``c(q) = 1 - H(q) / \log K`` (one minus the normalized
    entropy, for a distribution ``q`` over ``K`` classes):

    .. math::

        r = \frac{c(s)\, s + c(a)\, a}{c(s) + c(a)},\qquad
        \tilde p = c(p)\, p + (1 - c(p))\, r,\qquad
        p^\star = (1 - \tau)\, p + \tau\, \tilde p

    where ``s`` is the class distribution from similarity to the learnable anchors (summed softmax of negative
    anchor distances per class), ``a`` the class distribution from ARBEx's attention and ``\tau`` the trust
    (the authors ramp it from 0 to 1 over training). Inputs ``[B, K]``; returns ``p^\star`` ``[B, K]``.

    Example:
        >>> import torch
        >>> from headwise.variants.window_cross import reliability_balance
        >>> p = torch.tensor([[0.2, 0.7, 0.1]])
        >>> reliability_balance(torch.zeros(1, 3), p, p, trust=0.0)     # trust 0: the model's own softmax
        tensor([[0.3333, 0.3333, 0.3333]])
    """
    if not 0 <= trust <= 1:
        raise ValueError(f"trust must be in [0, 1], got trust={trust!r}")
    for name, t in (("anchor_similarity", anchor_similarity), ("attention_distribution", attention_distribution)):
        if t.shape != logits.shape:
            raise ValueError(f"{name} must have logits' shape {tuple(logits.shape)}, got {name}.shape={tuple(t.shape)}")
    K = logits.shape[-1]

    def confidence(q: Tensor) -> Tensor:
        h = -(q * q.clamp_min(1e-12).log()).sum(-1, keepdim=True)  # (B, 1)
        return 1 - h / math.log(K) if K > 1 else torch.ones_like(h)

    p = torch.softmax(logits / temperature, dim=-1)  # (B, K)
    cs, ca = confidence(anchor_similarity), confidence(attention_distribution)
    r = (cs * anchor_similarity + ca * attention_distribution) / (cs + ca).clamp_min(1e-12)  # (B, K)
    c = confidence(p)
    corrected = c * p + (1 - c) * r
    return (1 - trust) * p + trust * corrected
