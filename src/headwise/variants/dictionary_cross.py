"""RestoreFormer++'s multi-head cross-attention to a learned dictionary (registered as ``"dictionary_cross"``).

Wang et al., TPAMI 2023, "RestoreFormer++: Towards Real-World Blind Face Restoration from Undegraded Key-Value
Pairs": queries from the features, keys and values from learned dictionary entries. The attention is
:func:`headwise.attention`; the reference is :func:`~headwise.variants.mha.naive_mha` with the dictionary as the
context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.checks import check_positive_int, check_tokens
from headwise.core.attention import attention
from headwise.patterns import Pattern
from headwise.variants.base import Capabilities, ProjectedAttention, check_backend, resolve_pattern
from headwise.variants.registry import register

__all__ = ["DictionaryCrossAttention"]


@register("dictionary_cross")
class DictionaryCrossAttention(ProjectedAttention):
    r"""Multi-head cross-attention to a learned dictionary, after "RestoreFormer++: Towards Real-World Blind Face
    Restoration from Undegraded Key-Value Pairs" (Wang et al., TPAMI 2023).

    Queries come from the (degraded) features ``Z_d``; keys and values from ``S`` learned dictionary entries
    ``E`` (the high-quality priors):

    .. math::

        \mathrm{MHCA}(Z_d, E) = \mathrm{Concat}_h\Big(\mathrm{softmax}\big(Z_d W^Q_h (E W^K_h)^\top / \sqrt{D}\big)
        E W^V_h\Big) W^O

    RestoreFormer++ applies it at several scales of the decoder; :meth:`forward` takes one feature tensor or a
    sequence of them (one per scale, each ``[B, N_s, C]``) and applies the same dictionary and projections to each.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; dictionary ``[S, C]``; inside, q is ``[B, H, N, D]``, k and v
    ``[B, H_kv, S, D]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout, backend: as
            :class:`~headwise.variants.mha.MultiHeadAttention` (``W^Q = q_proj``, ``W^K = k_proj``,
            ``W^V = v_proj``, ``W^O = out_proj``).
        pattern: allowed (query position, dictionary entry) pairs; default None, all.
        entries: dictionary size ``S`` (default 1024, RestoreFormer's codebook size).

    Choices made here: RestoreFormer(++) takes keys/values from the *vector-quantized* features (each position's
    nearest codebook entry, learned in a separate VQ stage); here the whole dictionary is the key/value set and
    is learned end to end, which makes the module a self-contained attention layer (a Perceiver-style latent
    memory). One dictionary and one set of projections are shared by all scales. Entries are initialised
    ``N(0, 1)``. No residual connection or feed-forward: the caller's block adds them. Every output token reads
    only its own input token and the dictionary, so the module is causal by construction (it has no ``causal``
    field).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("dictionary_cross(entries=256)", dim=64, heads=4)
        >>> m(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    capabilities = Capabilities(causal="always")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "entries": 5}

    @dataclass
    class Config(ProjectedAttention.Config):
        pattern: Pattern | str | None = None  # allowed (query position, entry) pairs; None: all
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"
        entries: int = 1024  # number of learned dictionary entries S (the keys/values)

        def __post_init__(self):
            super().__post_init__()
            self.pattern = resolve_pattern(self.pattern, self.heads)
            check_backend(self.backend)
            check_positive_int("entries", self.entries)

    def build(self, cfg) -> None:
        super().build(cfg)
        self.dictionary = nn.Parameter(torch.randn(cfg.entries, cfg.dim))  # (S, C)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention with the config's pattern: ``q`` ``[B, H, N, D]``, ``k, v`` ``[B, H_kv, S, D]``."""
        return attention(q, k, v, self.config.pattern, backend=self.config.backend)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """``x`` ``[B, N, C]`` (or a list of them, one per scale) attends to the dictionary; same shape(s) out."""
        if isinstance(x, (list, tuple)):
            return [self.forward(t) for t in x]
        check_tokens("x", x, self.dim)
        entries = self.dictionary.expand(x.shape[0], -1, -1)  # (B, S, C)
        return self.finish(self.attend(*self.project(x, entries)))  # (B, N, C)
