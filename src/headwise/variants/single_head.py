"""SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (Yun & Ro, 2024): single-head
attention on a fraction of the channels (registered as ``"single_head"``).

One attention head (:func:`headwise.attention`, so every pattern and backend applies) on the first channels, the
rest passed through, a projection mixing both. The module reference is :func:`naive_single_head`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import (
    check_bool,
    check_choice,
    check_positive_int,
    check_tokens,
    is_number,
)
from headwise.core.attention import attention
from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Pattern
from headwise.variants.base import Capabilities, Variant, check_backend, resolve_pattern, with_causal
from headwise.variants.registry import register

__all__ = ["SingleHeadAttention", "naive_single_head"]


@register("single_head")
class SingleHeadAttention(Variant):
    r"""Single-head self-attention on a fraction of the channels (SHSA; Yun & Ro, 2024, "SHViT: Single-Head Vision
    Transformer with Memory Efficient Macro Design").

    The first ``C_p = round(partial * C)`` channels go through one attention head, the rest pass through
    untouched, and a projection mixes both:

    .. math::

        x = [x_1, x_2],\ x_1 \in \mathbb{R}^{N \times C_p},\qquad
        q, k, v = \mathrm{GN}(x_1) [W_q, W_k, W_v]\ \ (q, k \in \mathbb{R}^{N \times d_{qk}},\ v \in \mathbb{R}^{N \times C_p})

        y = \mathrm{ReLU}\big([\mathrm{softmax}(q k^\top / \sqrt{d_{qk}})\, v,\ x_2]\big)\, W_o

    ``GN`` is a one-group GroupNorm over (tokens, channels) of each sample with a per-channel affine, as in
    SHViT (``norm="group"``). Its statistics span the whole sequence, so a causal pattern would still see the
    future through them: causal attention needs ``norm="layer"`` (a per-token LayerNorm, our departure for
    autoregressive use), and ``norm="group"`` with ``causal=True`` or a causal pattern raises. Shapes: ``x``
    ``[B, N, C]`` -> ``[B, N, C]``; the head is q, k ``[B, 1, N, d_qk]``, v ``[B, 1, N, C_p]``. There is no
    ``heads`` argument: the module has one head by design.

    Args:
        dim: model width ``C``.
        partial: fraction of channels given to the head, in ``(0, 1]``; default 0.25 (SHViT's
            ``partial_dim / embed_dim`` = 32/128, 64/256, 96/384).
        qk_dim: query/key width ``d_qk``; default 16 (SHViT).
        pattern: a pattern or spec string for the head (default None: full attention).
        causal: query ``i`` sees keys ``j <= i`` only (intersected with ``pattern``); default False.
        qkv_bias: bias in the qkv projection; default True.
        out_bias: bias in the output projection; default True. (``bias=`` sets both, formerly.)
        backend: :func:`headwise.attention` backend; default ``"auto"``.
        norm: ``"group"`` (SHViT's GroupNorm over the sequence), ``"layer"`` (per token; causal-safe) or ``"auto"``
            (default): ``"layer"`` with ``causal=True`` or a :class:`~headwise.patterns.Causal` pattern, else
            ``"group"``.

    Choices made here: SHViT works on ``[B, C, H, W]`` maps with 1x1 convolutions followed by BatchNorm (the
    output one initialised to zero); we use tokens ``[B, N, C]`` and linear layers with bias (what the BatchNorms
    fold into at inference) with the default initialisation, so the module is not the identity at start. The
    parameters are ``pre_norm``, ``qkv`` (``C_p -> 2 d_qk + C_p``, fused) and ``proj`` (``C -> C``).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("single_head(partial=0.25)", dim=384)
        >>> m(torch.randn(2, 196, 384)).shape
        torch.Size([2, 196, 384])
    """

    capabilities = Capabilities(causal="optional")
    example_config = {"dim": 16, "partial": 0.5, "qk_dim": 4}
    aliases = {"bias": ("qkv_bias", "out_bias")}

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        partial: float = 0.25  # fraction of channels given to the single head, in (0, 1]
        qk_dim: int = 16  # width of the query and the key
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        causal: bool = False  # query i sees keys j <= i only (intersected with pattern); needs the per-token norm
        qkv_bias: bool = True  # bias in the (fused) qkv projection
        out_bias: bool = True  # bias in the output projection
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"
        norm: str = "auto"  # head pre-norm: "group" (over the sequence, SHViT), "layer" (per token), "auto" (below)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            if not is_number(self.partial) or not 0 < self.partial <= 1:
                raise ValueError(f"partial must be a fraction in (0, 1], got partial={self.partial!r}")
            if round(self.partial * self.dim) < 1:
                raise ValueError(f"partial={self.partial} leaves no channel for the head with dim={self.dim}")
            check_positive_int("qk_dim", self.qk_dim)
            self.pattern = resolve_pattern(self.pattern, 1)
            check_bool("causal", self.causal)
            check_bool("qkv_bias", self.qkv_bias)
            check_bool("out_bias", self.out_bias)
            check_backend(self.backend)
            check_choice("norm", self.norm, ("auto", "group", "layer"))
            causal = self.causal or isinstance(self.pattern, Causal)
            if self.norm == "auto":  # the paper's GroupNorm, unless that would leak the future
                self.norm = "layer" if causal else "group"
            if self.norm == "group" and causal:
                what = "causal=True" if self.causal else f"pattern={self.pattern!r}"
                raise ValueError(f"norm='group' normalizes over the whole sequence, so {what} would still see "
                                 "future tokens; use norm='layer' for causal attention")

    def build(self, cfg) -> None:
        C_p = self.pdim
        self.pre_norm = nn.GroupNorm(1, C_p) if cfg.norm == "group" else nn.LayerNorm(C_p)
        self.qkv = nn.Linear(C_p, 2 * cfg.qk_dim + C_p, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.out_bias)
        self.pattern = with_causal(cfg.pattern, cfg.causal)  # the pattern every call applies

    @property
    def pdim(self) -> int:
        """``C_p = round(partial * dim)``: the channels given to the head (and the value width)."""
        return round(self.config.partial * self.config.dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        cfg = self.config
        check_tokens("x", x, cfg.dim)
        C_p = self.pdim
        x1, x2 = x.split([C_p, cfg.dim - C_p], dim=-1)  # (B, N, C_p), (B, N, C - C_p)
        if isinstance(self.pre_norm, nn.GroupNorm):  # statistics over (tokens, channels) of each sample
            x1 = self.pre_norm(x1.transpose(1, 2)).transpose(1, 2)  # (B, N, C_p)
        else:
            x1 = self.pre_norm(x1)  # (B, N, C_p), per token
        q, k, v = self.qkv(x1)[:, None].split([cfg.qk_dim, cfg.qk_dim, C_p], dim=-1)  # (B, 1, N, d_qk|C_p)
        o = attention(q, k, v, self.pattern, backend=cfg.backend)[:, 0]  # (B, N, C_p)
        return self.proj(F.relu(torch.cat([o, x2], dim=-1)))  # (B, N, C)


def naive_single_head(m: SingleHeadAttention, x: Tensor) -> Tensor:
    """The reference of :class:`SingleHeadAttention`, written out with its weights: the pre-norm from its
    statistics (over the sequence and channels for ``norm="group"``, per token for ``"layer"``), the fused
    projection split by hand, materialized attention (:func:`headwise.core.reference.naive_attention`), ReLU of
    the concatenation with the untouched channels, output projection."""
    p, d = m.pdim, m.config.qk_dim
    x1, x2 = x[..., :p], x[..., p:]
    dims = (1, 2) if m.config.norm == "group" else (2,)  # GroupNorm(1): over the sequence; LayerNorm: per token
    mu = x1.mean(dims, keepdim=True)
    var = x1.var(dims, unbiased=False, keepdim=True)
    x1 = (x1 - mu) / torch.sqrt(var + m.pre_norm.eps) * m.pre_norm.weight + m.pre_norm.bias
    qkv = F.linear(x1, m.qkv.weight, m.qkv.bias)  # (B, N, 2 d_qk + C_p)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    o = naive_attention(q[:, None], k[:, None], v[:, None], m.pattern)[0][:, 0]  # (B, N, C_p)
    return F.linear(torch.relu(torch.cat([o, x2], -1)), m.proj.weight, m.proj.bias)  # (B, N, C)
