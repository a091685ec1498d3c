"""Multi-head, grouped-query and multi-query attention (registered as ``"mha"``, ``"gqa"``, ``"mqa"``).

Multi-head attention from "Attention Is All You Need" (Vaswani et al., 2017), with the key/value heads shared
by groups of query heads as in grouped-query attention (GQA: Ainslie et al., 2023, "GQA: Training Generalized
Multi-Query Transformer Models from Multi-Head Checkpoints") and multi-query attention (MQA: Shazeer, 2019,
"Fast Transformer Decoding: One Write-Head is All You Need"). The modules own the projections and call
:func:`headwise.attention` for the attention itself, so every pattern and backend works with them. The dense
reference of the module is :func:`naive_mha`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise import patterns
from headwise.core.padding import key_masked_attention
from headwise.variants.base import Capabilities, SoftmaxAttention, naive_projections
from headwise.variants.registry import register

__all__ = ["MultiHeadAttention", "GroupedQueryAttention", "MultiQueryAttention", "naive_mha"]


@register("mha")
class MultiHeadAttention(SoftmaxAttention):
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
        causal: query ``i`` attends keys ``j <= i`` only, intersected with ``pattern`` (default False;
            ``causal=True`` is ``pattern=Causal()``).
        qkv_bias: bias in the q, k, v projections (default True).
        out_bias: bias in the output projection (default True).
        dropout: dropout probability on the module output, in ``[0, 1)`` (default 0).
        backend: :func:`headwise.attention` backend, ``"auto"`` (default), ``"reference"``, ``"sdpa"``,
            ``"blocksparse"`` or ``"flex"``.

    Choices made here: ``q_proj`` is ``W^Q`` (``C -> H D``), ``k_proj`` and ``v_proj`` are ``W^K`` and ``W^V``
    (``C -> H_kv D``); the output projection ``out_proj`` is ``H D -> C``.
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

    capabilities = Capabilities(causal="optional", context=True, key_padding=True, softmax=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2}

    def forward(self, x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attend from ``x`` ``[B, N, C]`` to ``context`` ``[B, M, C]`` (``x`` itself when None); returns ``[B, N, C]``.

        ``key_padding_mask``: optional ``[B, M]`` bool, True where a key is padding and must be ignored (the
        :class:`torch.nn.MultiheadAttention` convention). It combines with the module's ``pattern``.
        """
        q, k, v = self.project(x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        if key_padding_mask is None:
            return self.finish(self.attend(q, k, v))  # (B, N, C)
        self._check_padding(key_padding_mask, x.shape[0], k.shape[2])
        out = key_masked_attention(q, k, v, ~key_padding_mask, self.pattern, self.backend)  # (B, H, N, D)
        return self.finish(out)  # (B, N, C)

    @staticmethod
    def _check_padding(key_padding_mask: Tensor, B: int, M: int) -> None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor [B, M] (True = padded key), got {got}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must be [B, M] = {[B, M]}, got key_padding_mask.shape="
                             f"{tuple(key_padding_mask.shape)}")


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
        >>> headwise.create("mqa", dim=512, heads=8).k_proj.out_features   # 1 key head of 64
        64
    """

    example_config = {"dim": 16, "heads": 4}

    @dataclass
    class Config(MultiHeadAttention.Config):
        def default_kv_heads(self) -> int:
            """Always 1: one key/value head."""
            return 1

        def __post_init__(self):
            if self.kv_heads not in (None, 1):
                raise ValueError(f"mqa has exactly one key/value head, got kv_heads={self.kv_heads!r}; use gqa for more")
            super().__post_init__()


def naive_mha(m: SoftmaxAttention, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None,
              pattern: patterns.Pattern | None | str = "module") -> Tensor:
    """The reference of :class:`MultiHeadAttention` (and of every :class:`~headwise.variants.base.SoftmaxAttention`
    step), written out with the module's own weights: ``F.linear`` projections, materialized scores, the
    pattern's dense mask and the padding mask, softmax (rows with no key give zeros), output projection.

    ``pattern``: the mask to apply; default ``"module"``, the module's :meth:`attention_pattern`. Shapes as
    :meth:`MultiHeadAttention.forward`. The output dropout is not applied (compare in ``eval()`` mode).
    """
    q, k, v = naive_projections(m, x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
    B, H, N, D = q.shape
    M = k.shape[2]
    k = k.repeat_interleave(H // m.kv_heads, dim=1)  # (B, H, M, D): query head h reads kv head h // (H / H_kv)
    v = v.repeat_interleave(H // m.kv_heads, dim=1)  # (B, H, M, D)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, N, M)
    allowed = torch.ones(B, H, N, M, dtype=torch.bool, device=x.device)
    if isinstance(pattern, str) and pattern == "module":
        pattern = m.attention_pattern(N, M)
    if pattern is not None:
        allowed &= pattern.dense_mask(N, M).to(x.device)[None]  # (1, H or 1, N, M)
    if key_padding_mask is not None:
        allowed &= ~key_padding_mask[:, None, None, :]  # (B, 1, 1, M)
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)  # (B, H, N, M)
    out = (p @ v).transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
