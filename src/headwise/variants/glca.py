"""DCAL's global-local cross-attention (registered as ``"glca"``).

Zhu et al., CVPR 2022, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification": the tokens with the highest accumulated attention (attention rollout) become local queries that
attend to every token. The selection is :func:`headwise.ops.selection.tokens.rollout_select` (on
:func:`~headwise.ops.selection.tokens.attention_rollout` scores); the attention is :func:`headwise.attention`; the
reference is :func:`~headwise.variants.mha.naive_mha` from the selected tokens to all tokens. DCAL's pair-wise
cross-attention is :mod:`headwise.variants.pwca`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.checks import check_number, check_tokens
from headwise.core.attention import attention
from headwise.ops.selection.tokens import rollout_select
from headwise.patterns import Pattern
from headwise.variants.base import Capabilities, ProjectedAttention, check_backend, resolve_pattern
from headwise.variants.registry import register

__all__ = ["GlobalLocalCrossAttention"]


@register("glca")
class GlobalLocalCrossAttention(ProjectedAttention):
    r"""Global-Local Cross-Attention from "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
    Object Re-Identification" (Zhu et al., CVPR 2022).

    The ``R`` tokens with the highest accumulated attention (attention rollout,
    :func:`~headwise.ops.selection.tokens.attention_rollout`, row of the class token) form local queries ``Q^l``;
    they attend to all tokens' keys and values:

    .. math::

        f_{GLCA}(Q^l, K^g, V^g) = \mathrm{softmax}\big(Q^l {K^g}^\top / \sqrt{d}\big)\, V^g

    (multi-head, with per-token projections ``q_proj``, ``k_proj``, ``v_proj`` and the output projection
    ``out_proj``). ``R = ceil(r N)`` with ``r = local_ratio`` (the paper: 10% for fine-grained categorization, 30%
    for re-identification).

    Shapes: ``x`` ``[B, N, C]``, ``scores`` ``[B, N]`` (higher = more important) -> ``(out, idx)``: ``out``
    ``[B, R, C]`` the cross-attention output of the selected tokens, ``idx`` ``[B, R]`` their positions in
    ``x`` (sorted by descending score). Inside, q is ``[B, H, R, D]``, k and v ``[B, H_kv, N, D]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout, backend: as
            :class:`~headwise.variants.mha.MultiHeadAttention`.
        pattern: allowed (query, key) pairs of the ``R x N`` cross-attention (indices are the query's rank among
            the selected tokens and the key's position); default None, all.
        local_ratio: fraction ``r`` of tokens used as local queries, in ``(0, 1]`` (default 0.1).

    Choices made here: when ``scores`` is not given, the module ranks tokens by a one-layer rollout of its own
    attention, ``0.5 softmax(q_0 K^T / sqrt(d)) + 0.5 e_0`` averaged over heads (``q_0``: token 0, the class
    token); pass the rollout of the preceding self-attention layers to follow the paper. Token 0 competes with
    the other tokens for a place among the ``R``. With ``local_ratio=1`` every token is a query and the output
    (put back in order by ``idx``) is plain multi-head self-attention. The output has ``R`` tokens, not ``N``:
    GLCA is a branch of DCAL's model (its own classifier reads it), not a token mixer. No causal mode.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("glca(local_ratio=0.25)", dim=64, heads=4)
        >>> out, idx = m(torch.randn(2, 17, 64), scores=torch.rand(2, 17))
        >>> out.shape, idx.shape
        (torch.Size([2, 5, 64]), torch.Size([2, 5]))
    """

    capabilities = Capabilities(output="tuple", mixer=False)  # out is [B, R, C]: the R selected tokens
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "local_ratio": 0.4}

    @dataclass
    class Config(ProjectedAttention.Config):
        pattern: Pattern | str | None = None  # allowed (query rank, key position) pairs; None: all
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"
        local_ratio: float = 0.1  # fraction r of tokens used as local queries (R = ceil(r N)), in (0, 1]

        def __post_init__(self):
            super().__post_init__()
            self.pattern = resolve_pattern(self.pattern, self.heads)
            check_backend(self.backend)
            self.local_ratio = check_number("local_ratio", self.local_ratio, 0, 1, low_open=True)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention with the config's pattern: ``q`` ``[B, H, R, D]``, ``k, v`` ``[B, H_kv, N, D]``."""
        return attention(q, k, v, self.config.pattern, backend=self.config.backend)

    def forward(self, x: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        check_tokens("x", x, self.dim)
        B, N, C = x.shape
        if scores is None:
            scores = self.cls_rollout(x)  # (B, N)
        elif not isinstance(scores, Tensor) or tuple(scores.shape) != (B, N):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a tensor [B, N] = {[B, N]}, got scores.shape={got}")
        idx = rollout_select(scores, self.config.local_ratio)  # (B, R) best first, ties to the lower index
        R = idx.shape[1]
        local = torch.gather(x, 1, idx[..., None].expand(B, R, C))  # (B, R, C)
        return self.finish(self.attend(*self.project(local, x))), idx  # (B, R, C), (B, R)

    def cls_rollout(self, x: Tensor) -> Tensor:
        """One-layer rollout of this module's own attention from token 0: ``[B, N]`` (used when no scores)."""
        with torch.no_grad():
            q, k, _ = self.project(x[:, :1], x)  # (B, H, 1, D), (B, H_kv, N, D)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, H, N, D)
            s = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)  # (B, H, 1, N)
            s = 0.5 * s.mean(1)[:, 0]  # (B, N)
            s[:, 0] += 0.5
        return s
