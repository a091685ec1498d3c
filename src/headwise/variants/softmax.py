"""Softmax multi-head attention modules: MHA, GQA and MQA (registered as ``"mha"``, ``"gqa"``, ``"mqa"``).

Multi-head attention from "Attention Is All You Need" (Vaswani et al., 2017), with the key/value heads shared
by groups of query heads as in grouped-query attention (GQA: Ainslie et al., 2023, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints") and multi-query attention (MQA: Shazeer, 2019,
"Fast Transformer Decoding: One Write-Head is All You Need"). The modules own the projections and call
:func:`headwise.attention` for the attention itself, so every pattern and backend works with them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise import patterns
from headwise.core.attention import BACKENDS, attention
from headwise.patterns import Pattern
from headwise.variants.checks import check_positive_int
from headwise.variants.registry import register

__all__ = ["MultiHeadAttention", "GroupedQueryAttention", "MultiQueryAttention"]





@register("mha")
class MultiHeadAttention(nn.Module):
    r"""Multi-head softmax attention (Vaswani et al., 2017), batch-first, with GQA/MQA key/value sharing.

    .. math::

        \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\big(Q K^\top / \sqrt{d_k} + \mathrm{mask}\big)\, V

        \mathrm{MultiHead}(x, c) = \mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_H)\, W^O,\quad
        \mathrm{head}_h = \mathrm{Attention}(x W^Q_h,\; c W^K_{g(h)},\; c W^V_{g(h)})

    with ``c = x`` for self-attention, ``d_k = head_dim`` and ``g(h) = h // (H / H_kv)``: query head ``h`` reads
    key/value head ``g(h)``. ``H_kv = H`` is MHA, ``1 < H_kv < H`` grouped-query attention (GQA, Ainslie et al.,
    2023), ``H_kv = 1`` multi-query attention (MQA, Shazeer, 2019). ``mask`` is ``-inf`` where the ``pattern``
    or the ``key_padding_mask`` forbids a (query, key) pair; a query left with no key outputs zeros before
    ``W^O`` (so the module returns the output bias there), never NaN.

    Shapes: ``x`` ``[B, N, C]``, ``context`` ``[B, M, C]`` (``C = dim``) -> ``[B, N, C]``; inside, q is
    ``[B, H, N, D]`` and k, v are ``[B, H_kv, M, D]`` with ``D = head_dim``.

    Args:
        dim: model width ``C`` of the input and output.
        heads: number of query heads ``H``.
        kv_heads: number of key/value heads ``H_kv`` (``H % H_kv == 0``); default ``heads`` (MHA).
        head_dim: per-head width ``D``; default ``dim // heads`` (then ``dim % heads == 0`` is required).
        pattern: a :class:`headwise.patterns.Pattern` or a pattern spec string (parsed by
            ``headwise.patterns.from_spec``) restricting which (query, key) pairs attend; default ``None``,
            full attention.
        qkv_bias: bias in the q, k, v projections (default True).
        out_bias: bias in the output projection (default True).
        dropout: dropout probability on the module output, in ``[0, 1)`` (default 0).
        backend: :func:`headwise.attention` backend, ``"auto"`` (default), ``"reference"``, ``"sdpa"``,
            ``"blocksparse"`` or ``"flex"``.

    Choices made here: q is one projection ``W^Q`` (``C -> H D``) and k, v one fused projection ``C -> 2 H_kv D``
    (``kv_proj``: rows ``[:H_kv D]`` are ``W^K``, the rest ``W^V``); the output projection is ``H D -> C``.
    ``dropout`` is the residual dropout of the paper (Sec. 5.4), applied to the module output, not to the
    attention probabilities as :class:`torch.nn.MultiheadAttention` does (:func:`headwise.attention` has no
    probability dropout). Weights use the default :class:`torch.nn.Linear` initialisation. The context has the
    same width ``dim`` as ``x``.

    Example:
        >>> import torch, headwise
        >>> m = headwise.MultiHeadAttention(256, heads=8, kv_heads=2, pattern=headwise.patterns.Causal())
        >>> x = torch.randn(2, 100, 256)                                     # [B, N, C]
        >>> pad = torch.zeros(2, 100, dtype=torch.bool); pad[1, 80:] = True  # True = padded key
        >>> m(x, key_padding_mask=pad).shape
        torch.Size([2, 100, 256])
        >>> m(x, torch.randn(2, 7, 256)).shape                               # cross-attention to 7 tokens
        torch.Size([2, 100, 256])
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of query heads H
        kv_heads: int | None = None  # key/value heads H_kv, H % H_kv == 0; None: the family default (mha: H)
        head_dim: int | None = None  # per-head width D; None: dim // heads
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projection
        dropout: float = 0.0  # dropout probability on the module output, in [0, 1)
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.kv_heads is None:
                self.kv_heads = self.default_kv_heads()
            check_positive_int("kv_heads", self.kv_heads)
            if self.heads % self.kv_heads:
                raise ValueError(f"heads must be a multiple of kv_heads, got heads={self.heads} kv_heads={self.kv_heads}")
            if self.head_dim is None:
                if self.dim % self.heads:
                    raise ValueError(f"dim must be divisible by heads when head_dim is None, got dim={self.dim} "
                                     f"heads={self.heads}; pass head_dim= to choose the head width")
                self.head_dim = self.dim // self.heads
            check_positive_int("head_dim", self.head_dim)
            if isinstance(self.pattern, str):
                self.pattern = patterns.from_spec(self.pattern)
            if self.pattern is not None and not isinstance(self.pattern, Pattern):
                raise TypeError(f"pattern must be a headwise Pattern, a pattern spec string or None, "
                                f"got pattern={self.pattern!r} ({type(self.pattern).__name__})")
            if self.pattern is not None and self.pattern.heads not in (None, self.heads):
                raise ValueError(f"head-specific pattern has {self.pattern.heads} heads but heads={self.heads}")
            for name in ("qkv_bias", "out_bias"):
                if not isinstance(getattr(self, name), bool):
                    raise TypeError(f"{name} must be a bool, got {name}={getattr(self, name)!r}")
            if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
                raise ValueError(f"dropout must be a number in [0, 1), got dropout={self.dropout!r}")
            self.dropout = float(self.dropout)
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"unknown backend={self.backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))

        def default_kv_heads(self) -> int:
            """``kv_heads`` when not given: one key/value head per query head."""
            return self.heads

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        pattern: Pattern | str | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern,
            qkv_bias=qkv_bias, out_bias=out_bias, dropout=dropout, backend=backend,
        )
        self.dim, self.heads, self.kv_heads, self.head_dim = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_dim
        self.pattern, self.backend = cfg.pattern, cfg.backend
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.kv_proj = nn.Linear(cfg.dim, 2 * cfg.kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Check ``x`` ``[B, N, C]`` and ``context`` ``[B, M, C]`` (``x`` when None) and project them to
        ``q`` ``[B, H, N, D]``, ``k`` and ``v`` ``[B, H_kv, M, D]`` (shared by the variants built on this class)."""
        self._check_tokens("x", x)
        B, N, _ = x.shape
        if context is None:
            context = x
        else:
            self._check_tokens("context", context)
            if context.shape[0] != B:
                raise ValueError(f"x and context batch sizes differ: x.shape={tuple(x.shape)}, "
                                 f"context.shape={tuple(context.shape)}")
        M = context.shape[1]
        H, H_kv, D = self.heads, self.kv_heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv_proj(context).view(B, M, 2, H_kv, D).permute(2, 0, 3, 1, 4)  # 2 x (B, H_kv, M, D)
        return q, k, v

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend from ``x`` ``[B, N, C]`` to ``context`` ``[B, M, C]`` (``x`` itself when None); returns ``[B, N, C]``.

        ``key_padding_mask``: optional ``[B, M]`` bool, True where a key is padding and must be ignored (the
        :class:`torch.nn.MultiheadAttention` convention). It combines with the module's ``pattern``.
        """
        q, k, v = self.project(x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        B, M = x.shape[0], k.shape[2]
        if key_padding_mask is None:
            out = attention(q, k, v, self.pattern, backend=self.backend)  # (B, H, N, D)
        else:
            self._check_padding(key_padding_mask, B, M)
            out = self._attend_padded(q, k, v, ~key_padding_mask)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, x.shape[1], -1)  # (B, N, H*D)
        return self.dropout(self.out_proj(out))  # (B, N, C)

    def _attend_padded(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor) -> Tensor:
        """Attention with keys restricted per batch element by ``keep`` ``[B, M]`` (True = a real key)."""
        empty = ~keep.any(-1)  # (B,) elements whose every key is padding
        if self.pattern is None and self.backend in ("auto", "sdpa"):
            # full attention: one dense SDPA call with a [B, 1, 1, M] mask (all-padding elements attend to
            # everything, so no NaN reaches the backward, and are zeroed afterwards)
            mask = (keep | empty[:, None])[:, None, None, :]  # (B, 1, 1, M)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
            return out.masked_fill(empty[:, None, None, None], 0.0)  # (B, H, N, D)
        # otherwise one headwise.attention call per distinct padding mask, its keys restricted by KeyMask
        masks, which = torch.unique(keep, dim=0, return_inverse=True)  # (U, M), (B,)
        outs, order = [], []
        for u, keep_u in enumerate(masks):
            idx = (which == u).nonzero().squeeze(1)  # (B_u,)
            pattern = self.pattern
            if not bool(keep_u.all()):
                key_mask = patterns.KeyMask(keep_u)
                pattern = key_mask if pattern is None else pattern & key_mask
            outs.append(attention(q[idx], k[idx], v[idx], pattern, backend=self.backend))  # (B_u, H, N, D)
            order.append(idx)
        if len(outs) == 1:
            return outs[0]
        return torch.cat(outs)[torch.argsort(torch.cat(order))]  # (B, H, N, D) in batch order

    def _check_tokens(self, name: str, t: Tensor) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, N, C], got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != self.dim:
            raise ValueError(f"{name} must be [B, N, C] with C = dim = {self.dim}, got {name}.shape={tuple(t.shape)}")
        if t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must have at least one batch element and token, got {name}.shape={tuple(t.shape)}")

    @staticmethod
    def _check_padding(key_padding_mask: Tensor, B: int, M: int) -> None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor [B, M] (True = padded key), got {got}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must be [B, M] = {[B, M]}, got key_padding_mask.shape="
                             f"{tuple(key_padding_mask.shape)}")

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, kv_heads={c.kv_heads}, head_dim={c.head_dim}, "
                f"pattern={c.pattern!r}, backend={c.backend!r}")


@register("gqa")
class GroupedQueryAttention(MultiHeadAttention):
    """Grouped-query attention (Ainslie et al., 2023): groups of ``heads // kv_heads`` query heads share one
    key/value head. Same module as :class:`MultiHeadAttention`; only the default differs: ``kv_heads`` defaults
    to ``heads // 4`` (4 query heads per key/value head) when ``heads`` is a multiple of 4, and must be given
    otherwise (a choice of headwise; the paper converts checkpoints with 8 groups, i.e. a model-dependent ratio).

    Example:
        >>> import headwise
        >>> headwise.create("gqa", dim=512, heads=8).config.kv_heads
        2
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
        def default_kv_heads(self) -> int:
            """``heads // 4`` when ``heads`` is a multiple of 4; otherwise ``kv_heads`` must be given."""
            if self.heads % 4:
                raise ValueError(f"gqa: kv_heads defaults to heads // 4, which needs heads divisible by 4, got "
                                 f"heads={self.heads}; pass kv_heads= explicitly")
            return self.heads // 4


@register("mqa")
class MultiQueryAttention(MultiHeadAttention):
    """Multi-query attention (Shazeer, 2019): every query head shares a single key/value head (``kv_heads=1``).
    Same module as :class:`MultiHeadAttention` with ``kv_heads`` fixed to 1; any other value is an error.

    Example:
        >>> import headwise
        >>> headwise.create("mqa", dim=512, heads=8).kv_proj.out_features   # 2 * 1 * 64
        128
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
        def default_kv_heads(self) -> int:
            """Always 1: one key/value head."""
            return 1

        def __post_init__(self):
            if self.kv_heads not in (None, 1):
                raise ValueError(f"mqa has exactly one key/value head, got kv_heads={self.kv_heads!r}; use gqa for more")
            super().__post_init__()
