"""Cross-attention and pooling modules from vision papers: MEDUSA's multi-scale heads (``"multiscale_heads"``),
DCAL's global-local and pair-wise cross-attention (``"glca"``, ``"pwca"``), RestoreFormer++'s cross-attention to
a learned dictionary (``"dictionary_cross"``), ACMIL's multiple-branch attention pooling (``"mil_attention"``),
DiTCtrl / IR-Diffusion's region-masked key/value sharing between two passes (``"shared_kv"``) and ARBEx's
window cross-attention with reliability balancing (``"window_cross"``, :func:`reliability_balance`).

The softmax attention of every module here is :class:`~headwise.variants.mha.MultiHeadAttention` (its
projections and :func:`headwise.attention`); ACMIL's gated attention pooling is additive attention with learned
branch queries and keeps its scores explicit, because its top-k instance masking and its outputs need them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.core.attention import attention
from headwise.patterns import Pattern
from headwise.ops.selection.tokens import attention_rollout, rollout_select
from headwise.checks import check_positive_int
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = [
    "MultiScaleHeads",
    "GlobalLocalCrossAttention",
    "PairwiseCrossAttention",
    "attention_rollout",
    "DictionaryCrossAttention",
    "MILAttention",
    "MILOutput",
    "SharedKVAttention",
    "WindowCrossAttention",
    "naive_window_cross_attention",
    "relative_position_index",
    "reliability_balance",
]


# ---------------------------------------------------------------------------------------------------------------
# MEDUSA: one attention body, heads feeding different scales
# ---------------------------------------------------------------------------------------------------------------


@register("multiscale_heads")
class MultiScaleHeads(nn.Module):
    r"""Multi-scale heads on one self-attention body, after "MEDUSA: Multi-scale Encoder-Decoder Self-Attention
    Deep Neural Network Architecture for Medical Image Analysis" (Aboutalebi et al., 2021): a single
    self-attention body whose heads feed different scales of the network.

    The body is ordinary multi-head self-attention over the ``h x w`` token grid (one q/k/v projection, one
    attention for all heads). Its ``H`` heads are split into ``S = scales`` consecutive groups ``G_s`` of
    ``H / S`` heads; group ``s`` feeds scale ``s`` (grid downsampled by ``2^s``):

    .. math::

        o_h = \mathrm{softmax}(q_h k_h^\top / \sqrt{D})\, v_h, \qquad
        y_s = \mathrm{AvgPool}_{2^s}\Big(\sum_{h \in G_s} o_h W^O_h\Big) + b^O

    where ``W^O = [W^O_1 | ... | W^O_H]`` is the body's output projection split by head. With ``scales=1`` the
    module is exactly :class:`MultiHeadAttention`; for any ``scales`` the un-pooled group outputs sum to the
    MHA output, so the heads partition one attention body rather than being separate attention modules.

    Shapes: ``x`` ``[B, N, C]`` with ``N = h w`` (``grid``; a square grid by default) -> a tuple of ``scales``
    tensors, ``y_s`` ``[B, N / 4^s, C]`` on the ``h / 2^s x w / 2^s`` grid (row-major).

    Args:
        dim, heads, ...: as :class:`MultiHeadAttention` (``pattern`` restricts the body's attention).
        scales: number of scales ``S`` (default 2), ``heads % scales == 0``.

    Choices made here: MEDUSA's body is a convolutional encoder-decoder producing attention maps and its heads
    are small convolutional branches, whose exact layers the abstract does not give; here the "body" is a
    dot-product attention layer and a "head" is a group of its attention heads, pooled by averaging to its
    scale, so the mechanism (shared body, scale-specific heads) is what is kept. The grid sides must be
    divisible by ``2^(S-1)``.

    Example:
        >>> import torch, headwise
        >>> ys = headwise.create("multiscale_heads(scales=2)", dim=64, heads=4)(torch.randn(2, 64, 64))
        >>> [tuple(y.shape) for y in ys]
        [(2, 64, 64), (2, 16, 64)]
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
        scales: int = 2  # number of scales S; head group s feeds the grid downsampled by 2**s

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("scales", self.scales)
            if self.heads % self.scales:
                raise ValueError(f"heads must be divisible by scales, got heads={self.heads} scales={self.scales}")

    def __init__(
        self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
        pattern: Pattern | str | None = None, qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", scales: int = 2,
    ):
        super().__init__()
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias, out_bias=out_bias,
            dropout=dropout, backend=backend, scales=scales,
        )
        self.scales = cfg.scales
        # the attention body: its q/kv projections and attention; its out_proj split by head group
        self.body = MultiHeadAttention(**{k: getattr(cfg, k) for k in MultiHeadAttention.Config.__dataclass_fields__})

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> tuple[Tensor, ...]:
        """``x`` ``[B, N, C]`` on ``grid`` ``(h, w)`` (default square) -> ``scales`` tensors ``[B, N/4^s, C]``."""
        body = self.body
        q, k, v = body.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        B, N, C = x.shape
        h, w = self._grid(N, grid)
        o = attention(q, k, v, body.pattern, backend=body.backend)  # (B, H, N, D)
        G, D = body.heads // self.scales, body.head_dim
        W = body.out_proj.weight.view(C, self.scales, G * D)  # (C, S, G*D) column blocks per head group
        groups = o.view(B, self.scales, G, N, D).transpose(2, 3).reshape(B, self.scales, N, G * D)  # (B, S, N, G*D)
        outs = []
        for s in range(self.scales):
            y = groups[:, s] @ W[:, s].T  # (B, N, C)
            if s:
                f = 2 ** s
                y = F.avg_pool2d(y.transpose(1, 2).reshape(B, C, h, w), f)  # (B, C, h/f, w/f)
                y = y.flatten(2).transpose(1, 2)  # (B, N/f^2, C)
            if body.out_proj.bias is not None:
                y = y + body.out_proj.bias
            outs.append(body.dropout(y))
        return tuple(outs)

    def _grid(self, N: int, grid) -> tuple[int, int]:
        if grid is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"x has N={N} tokens, not a square grid; pass grid=(h, w)")
            grid = (side, side)
        h, w = grid
        if h * w != N:
            raise ValueError(f"grid={grid} does not multiply to N={N}")
        f = 2 ** (self.scales - 1)
        if h % f or w % f:
            raise ValueError(f"grid={grid} must be divisible by 2**(scales-1)={f} for scales={self.scales}")
        return h, w

    def extra_repr(self) -> str:
        return f"scales={self.scales}"


# ---------------------------------------------------------------------------------------------------------------
# DCAL: global-local and pair-wise cross-attention
# ---------------------------------------------------------------------------------------------------------------


@register("glca")
class GlobalLocalCrossAttention(MultiHeadAttention):
    r"""Global-Local Cross-Attention from "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
    Object Re-Identification" (Zhu et al., CVPR 2022).

    The ``R`` tokens with the highest accumulated attention (attention rollout, :func:`attention_rollout`, row of
    the class token) form local queries ``Q^l``; they attend to all tokens' keys and values:

    .. math::

        f_{GLCA}(Q^l, K^g, V^g) = \mathrm{softmax}\big(Q^l {K^g}^\top / \sqrt{d}\big)\, V^g

    (multi-head, with the projections and output projection of :class:`MultiHeadAttention`). ``R = ceil(r N)``
    with ``r = local_ratio`` (the paper: 10% for fine-grained categorization, 30% for re-identification).

    Shapes: ``x`` ``[B, N, C]``, ``scores`` ``[B, N]`` (higher = more important) -> ``(out, idx)``: ``out``
    ``[B, R, C]`` the cross-attention output of the selected tokens, ``idx`` ``[B, R]`` their positions in
    ``x`` (sorted by descending score).

    Args:
        dim, heads, ...: as :class:`MultiHeadAttention`.
        local_ratio: fraction ``r`` of tokens used as local queries, in ``(0, 1]`` (default 0.1).

    Choices made here: when ``scores`` is not given, the module ranks tokens by a one-layer rollout of its own
    attention, ``0.5 softmax(q_0 K^T / sqrt(d)) + 0.5 e_0`` averaged over heads (``q_0``: token 0, the class
    token); pass the rollout of the preceding self-attention layers to follow the paper. Token 0 competes with
    the other tokens for a place among the ``R``. With ``local_ratio=1`` every token is a query and the output
    (put back in order by ``idx``) is plain multi-head self-attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("glca(local_ratio=0.25)", dim=64, heads=4)
        >>> out, idx = m(torch.randn(2, 17, 64), scores=torch.rand(2, 17))
        >>> out.shape, idx.shape
        (torch.Size([2, 5, 64]), torch.Size([2, 5]))
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
        local_ratio: float = 0.1  # fraction r of tokens used as local queries (R = ceil(r N)), in (0, 1]

        def __post_init__(self):
            super().__post_init__()
            r = self.local_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"local_ratio must be a number in (0, 1], got local_ratio={r!r}")
            self.local_ratio = float(r)

    def __init__(
        self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
        pattern: Pattern | str | None = None, qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", local_ratio: float = 0.1,
    ):
        super().__init__(dim, heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias, out_bias=out_bias,
            dropout=dropout, backend=backend)
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias, out_bias=out_bias,
            dropout=dropout, backend=backend, local_ratio=local_ratio,
        )
        self.local_ratio = cfg.local_ratio

    def forward(self, x: Tensor, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check_tokens("x", x)
        B, N, C = x.shape
        if scores is None:
            scores = self.cls_rollout(x)  # (B, N)
        elif not isinstance(scores, Tensor) or tuple(scores.shape) != (B, N):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scores must be a tensor [B, N] = {[B, N]}, got scores.shape={got}")
        idx = rollout_select(scores, self.local_ratio)  # (B, R) best first, ties to the lower index
        R = idx.shape[1]
        local = torch.gather(x, 1, idx[..., None].expand(B, R, C))  # (B, R, C)
        return super().forward(local, x), idx  # (B, R, C), (B, R)

    def cls_rollout(self, x: Tensor) -> Tensor:
        """One-layer rollout of this module's own attention from token 0: ``[B, N]`` (used when no scores)."""
        with torch.no_grad():
            q, k, _ = self.project(x[:, :1], x)  # (B, H, 1, D), (B, H_kv, N, D)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)  # (B, H, N, D)
            s = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)  # (B, H, 1, N)
            s = 0.5 * s.mean(1)[:, 0]  # (B, N)
            s[:, 0] += 0.5
        return s

    def extra_repr(self) -> str:
        return super().extra_repr() + f", local_ratio={self.local_ratio}"


@register("pwca")
class PairwiseCrossAttention(MultiHeadAttention):
    r"""Pair-wise Cross-Attention from "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
    Object Re-Identification" (Zhu et al., CVPR 2022): a training-time regularizer in which the queries of one
    image attend to the keys and values of itself and of a distractor image:

    .. math::

        f_{PWCA}(Q_1, K_c, V_c) = \mathrm{softmax}\big(Q_1 K_c^\top / \sqrt{d}\big)\, V_c,\qquad
        K_c = [K_1; K_2],\; V_c = [V_1; V_2]

    The projections are those of self-attention (the paper shares PWCA's weights with the SA branch), so one
    module serves both: ``pair=None`` is plain self-attention, used at inference where PWCA is removed.

    Shapes: ``x`` ``[B, N, C]``, ``pair`` ``[B, M, C]`` (the other images; e.g. ``x[torch.randperm(B)]``) ->
    ``[B, N, C]``.

    Args: as :class:`MultiHeadAttention`.

    Choices made here: how the pair is sampled (the paper: random image pairs from the training set) is left to
    the caller. Attending to ``pair = x`` gives exactly self-attention (every key appears twice, with the same
    weight), which the tests check.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("pwca", dim=64, heads=4)
        >>> x = torch.randn(4, 17, 64)
        >>> m(x, pair=x[torch.randperm(4)]).shape
        torch.Size([4, 17, 64])
    """

    def forward(self, x: Tensor, pair: Tensor | None = None) -> Tensor:
        if pair is None:
            return super().forward(x)
        self._check_tokens("pair", pair)
        return super().forward(x, torch.cat([x, pair], dim=1))  # (B, N, C)


# ---------------------------------------------------------------------------------------------------------------
# RestoreFormer++: cross-attention to a learned key-value dictionary
# ---------------------------------------------------------------------------------------------------------------


@register("dictionary_cross")
class DictionaryCrossAttention(MultiHeadAttention):
    r"""Multi-head cross-attention to a learned dictionary, after "RestoreFormer++: Towards Real-World Blind Face
    Restoration from Undegraded Key-Value Pairs" (Wang et al., TPAMI 2023).

    Queries come from the (degraded) features ``Z_d``; keys and values from ``S`` learned dictionary entries
    ``E`` (the high-quality priors):

    .. math::

        \mathrm{MHCA}(Z_d, E) = \mathrm{Concat}_h\Big(\mathrm{softmax}\big(Z_d W^Q_h (E W^K_h)^\top / \sqrt{D}\big)
        E W^V_h\Big) W^O

    RestoreFormer++ applies it at several scales of the decoder; :meth:`forward` takes one feature tensor or a
    sequence of them (one per scale, each ``[B, N_s, C]``) and applies the same dictionary and projections to each.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; dictionary ``[S, C]``.

    Args:
        dim, heads, ...: as :class:`MultiHeadAttention`.
        entries: dictionary size ``S`` (default 1024, RestoreFormer's codebook size).

    Choices made here: RestoreFormer(++) takes keys/values from the *vector-quantized* features (each position's
    nearest codebook entry, learned in a separate VQ stage); here the whole dictionary is the key/value set and
    is learned end to end, which makes the module a self-contained attention layer (a Perceiver-style latent
    memory). One dictionary and one set of projections are shared by all scales. Entries are initialised
    ``N(0, 1)``. No residual connection or feed-forward: the caller's block adds them.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("dictionary_cross(entries=256)", dim=64, heads=4)
        >>> m(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
        entries: int = 1024  # number of learned dictionary entries S (the keys/values)

        def __post_init__(self):
            super().__post_init__()
            check_positive_int("entries", self.entries)

    def __init__(
        self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
        pattern: Pattern | str | None = None, qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", entries: int = 1024,
    ):
        super().__init__(dim, heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias, out_bias=out_bias,
            dropout=dropout, backend=backend)
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias, out_bias=out_bias,
            dropout=dropout, backend=backend, entries=entries,
        )
        self.dictionary = nn.Parameter(torch.randn(cfg.entries, dim))  # (S, C)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, (list, tuple)):
            return [self.forward(t) for t in x]
        self._check_tokens("x", x)
        entries = self.dictionary.expand(x.shape[0], -1, -1)  # (B, S, C)
        return super().forward(x, entries)  # (B, N, C)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", entries={self.config.entries}"


# ---------------------------------------------------------------------------------------------------------------
# ACMIL: multiple-branch gated attention pooling with stochastic top-k instance masking
# ---------------------------------------------------------------------------------------------------------------


class MILOutput(NamedTuple):
    """What :class:`MILAttention` returns."""

    bag: Tensor  # [B, C] bag embedding, pooled with the branch-averaged (unmasked) attention
    branches: Tensor  # [B, M, C] per-branch bag embeddings, pooled with the (masked) branch attention
    attention: Tensor  # [B, M, N] per-branch attention over instances (after masking), rows sum to 1
    logits: Tensor | None  # [B, classes] bag classifier on ``bag`` (None when classes is None)
    branch_logits: Tensor | None  # [B, M, classes] one classifier per branch (None when classes is None)


@register("mil_attention")
class MILAttention(nn.Module):
    r"""Multiple-branch attention pooling with stochastic top-k instance masking, from "Attention-Challenging
    Multiple Instance Learning for Whole Slide Image Classification" (ACMIL; Zhang et al., ECCV 2024), built on
    gated attention pooling (Ilse, Tomczak and Welling, ICML 2018).

    For a bag of ``N`` instances ``h_k`` (``[B, N, C]``) and ``M`` branches:

    .. math::

        s_{m,k} = w_m^\top\big(\tanh(V h_k) \odot \sigma(U h_k)\big),\qquad
        a_{m,k} = \mathrm{softmax}_k(s_{m,k} + \mathrm{mask}_{m,k}),\qquad
        z_m = \sum_k a_{m,k} h_k

    (Multiple Branch Attention). STKIM: in training, among each branch's top-``k`` instances (by ``s``),
    ``floor(k p)`` chosen uniformly at random get ``mask = -inf``, so a branch cannot rely on a few instances
    (``k = mask_top_k``, ``p = mask_ratio``). The bag embedding pools with the branch-averaged *unmasked*
    attention, ``\bar a_k = \frac{1}{M}\sum_m \mathrm{softmax}_k(s_{m,k})``, ``z = \sum_k \bar a_k h_k``; with
    ``classes`` set, a linear classifier per branch gives ``branch_logits`` (trained with the bag label and the
    paper's diversity loss) and one on ``z`` gives ``logits``.

    Shapes: bag ``x`` ``[B, N, C]`` -> :class:`MILOutput` (``bag`` ``[B, C]``, ``branches`` ``[B, M, C]``,
    ``attention`` ``[B, M, N]``, ``logits`` ``[B, classes]``, ``branch_logits`` ``[B, M, classes]``).

    Args:
        dim: instance feature width ``C``.
        branches: number of attention branches ``M`` (default 5, ACMIL's).
        hidden: width ``L`` of ``V`` and ``U`` (default 128).
        mask_top_k: ``k``, the number of top instances eligible for masking (default 10); 0 disables STKIM.
        mask_ratio: ``p``, the fraction of them masked, in ``[0, 1]`` (default 0.6, ACMIL's).
        classes: number of classes for the classifiers; None (default) returns no logits.

    Choices made here: masking uses ``floor(k p)`` instances as the authors' code does (not a Bernoulli draw
    per instance), with ``k = min(mask_top_k, N)``, and never masks all ``N`` instances of a branch (at most
    ``N - 1``). The top-k selection uses the scores without gradient. ACMIL's feature-reduction layer before
    pooling is left to the caller. Masking is active only in ``train()`` mode.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("mil_attention(classes=2)", dim=64).eval()
        >>> out = m(torch.randn(1, 500, 64))        # one bag of 500 instances
        >>> out.bag.shape, out.logits.shape, out.attention.shape
        (torch.Size([1, 64]), torch.Size([1, 2]), torch.Size([1, 5, 500]))
    """

    @dataclass
    class Config:
        dim: int  # instance feature width C of the bag [B, N, C]
        branches: int = 5  # number of attention branches M
        hidden: int = 128  # width L of the gated attention's V and U projections
        mask_top_k: int = 10  # top instances per branch eligible for stochastic masking; 0: no masking
        mask_ratio: float = 0.6  # fraction of the top-k instances masked in training, in [0, 1]
        classes: int | None = None  # classes of the bag and branch classifiers; None: no classifiers

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("branches", self.branches)
            check_positive_int("hidden", self.hidden)
            if isinstance(self.mask_top_k, bool) or not isinstance(self.mask_top_k, int) or self.mask_top_k < 0:
                raise ValueError(f"mask_top_k must be a non-negative int, got mask_top_k={self.mask_top_k!r}")
            p = self.mask_ratio
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"mask_ratio must be a number in [0, 1], got mask_ratio={p!r}")
            self.mask_ratio = float(p)
            if self.classes is not None:
                check_positive_int("classes", self.classes)

    def __init__(self, dim: int, *, branches: int = 5, hidden: int = 128, mask_top_k: int = 10,
                 mask_ratio: float = 0.6, classes: int | None = None):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, branches=branches, hidden=hidden, mask_top_k=mask_top_k,
                                        mask_ratio=mask_ratio, classes=classes)
        self.V = nn.Linear(dim, cfg.hidden)
        self.U = nn.Linear(dim, cfg.hidden)
        self.w = nn.Linear(cfg.hidden, cfg.branches)  # rows: the branch vectors w_m
        if cfg.classes is not None:
            self.branch_classifiers = nn.ModuleList(nn.Linear(dim, cfg.classes) for _ in range(cfg.branches))
            self.classifier = nn.Linear(dim, cfg.classes)

    def scores(self, x: Tensor) -> Tensor:
        """Gated attention scores ``s`` ``[B, M, N]`` of the instances ``x`` ``[B, N, C]``."""
        g = torch.tanh(self.V(x)) * torch.sigmoid(self.U(x))  # (B, N, L)
        return self.w(g).transpose(1, 2)  # (B, M, N)

    def instance_mask(self, s: Tensor) -> Tensor:
        """STKIM's mask ``[B, M, N]`` (True = masked): ``floor(k p)`` random instances among each branch's top k."""
        B, M, N = s.shape
        k = min(self.config.mask_top_k, N)
        drop = min(int(k * self.config.mask_ratio), N - 1)
        mask = torch.zeros_like(s, dtype=torch.bool)
        if drop == 0:
            return mask
        top = s.detach().topk(k, dim=-1).indices  # (B, M, k)
        pick = torch.rand(B, M, k, device=s.device).argsort(dim=-1)[..., :drop]  # (B, M, drop)
        return mask.scatter(-1, torch.gather(top, -1, pick), True)  # (B, M, N)

    def forward(self, x: Tensor) -> MILOutput:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.config.dim or x.shape[1] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a bag [B, N, C] with N >= 1 and C = dim = {self.config.dim}, got {got}")
        s = self.scores(x)  # (B, M, N)
        a = torch.softmax(s, dim=-1)  # (B, M, N) unmasked
        bag = a.mean(1, keepdim=True) @ x  # (B, 1, C)
        if self.training and self.config.mask_top_k > 0:
            a = torch.softmax(s.masked_fill(self.instance_mask(s), -math.inf), dim=-1)  # (B, M, N)
        branches = a @ x  # (B, M, C)
        bag = bag[:, 0]  # (B, C)
        logits = branch_logits = None
        if self.config.classes is not None:
            logits = self.classifier(bag)  # (B, classes)
            branch_logits = torch.stack([f(branches[:, m]) for m, f in enumerate(self.branch_classifiers)], 1)
        return MILOutput(bag, branches, a, logits, branch_logits)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, branches={c.branches}, hidden={c.hidden}, mask_top_k={c.mask_top_k}, "
                f"mask_ratio={c.mask_ratio}, classes={c.classes}")


# ---------------------------------------------------------------------------------------------------------------
# DiTCtrl / IR-Diffusion: keys and values shared from a reference pass, per region
# ---------------------------------------------------------------------------------------------------------------


@register("shared_kv")
class SharedKVAttention(MultiHeadAttention):
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
    ``key_regions`` ``[B, M]`` integer labels -> ``[B, N, C]``.

    Args: as :class:`MultiHeadAttention` (the projections are the layer's own, shared by both passes).

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

    def forward(self, x: Tensor, reference: Tensor | None = None, *, query_regions: Tensor | None = None,
                key_regions: Tensor | None = None) -> Tensor:
        if reference is None:
            if query_regions is not None or key_regions is not None:
                raise ValueError("query_regions/key_regions need a reference pass; got reference=None")
            return super().forward(x)
        if (query_regions is None) != (key_regions is None):
            raise ValueError("pass both query_regions [B, N] and key_regions [B, M], or neither")
        if query_regions is None:
            return super().forward(x, reference)
        q, k, v = self.project(x, reference)  # (B, H, N, D), 2 x (B, H_kv, M, D)
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
            o = self._attend_padded(q, k, v, keep)  # (B, H, N, D); zero where no key
            out = torch.where(rows[:, None, :, None], o, out)
            orphan |= rows & ~keep.any(-1, keepdim=True)
        if orphan.any():
            _, k_self, v_self = self.project(x)  # (B, H_kv, N, D)
            own = attention(q, k_self, v_self, self.pattern, backend=self.backend)  # (B, H, N, D)
            out = torch.where(orphan[:, None, :, None], own, out)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # (B, N, H*D)
        return self.dropout(self.out_proj(out))  # (B, N, C)


# ---------------------------------------------------------------------------------------------------------------
# ARBEx / POSTER++: window-based cross-attention from landmark queries to image windows
# ---------------------------------------------------------------------------------------------------------------


def relative_position_index(window: int) -> Tensor:
    """``[w*w, w*w]`` index into a ``(2w-1)^2`` table of the relative offset ``(di, dj)`` between two positions of a
    ``w x w`` window (the Swin Transformer's relative position index)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, w*w, w*w) in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]  # (w*w, w*w)


def naive_window_cross_attention(m: "WindowCrossAttention", x: Tensor, queries: Tensor) -> Tensor:
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
            k, v = F.linear(win, m.kv_proj.weight, m.kv_proj.bias).view(B, w * w, 2, Hh, D).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) * D ** -0.5 + bias  # (B, Hh, w*w, w*w)
            o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, w * w, C)  # (B, w*w, C)
            out[:, i:i + w, j:j + w] = F.linear(o, m.out_proj.weight, m.out_proj.bias).view(B, w, w, C)
    return out.permute(0, 3, 1, 2)  # (B, C, H, W)


@register("window_cross")
class WindowCrossAttention(nn.Module):
    r"""Window-based cross-attention from landmark queries to image windows, as used by "ARBEx: Attentive Feature
    Extraction with Reliability Balancing for Robust Facial Expression Learning" (Wasi et al., 2023) in its
    POSTER++ feature extractor (Mao et al., 2023).

    The image feature map is split into non-overlapping ``w x w`` windows; the landmark feature map, one window
    in size, supplies the same queries to every window; keys and values come from the (layer-normalized) window
    tokens, and a learned relative-position bias (Swin's ``(2w-1)^2``-entry table per head) is added to the
    scores:

    .. math::

        o^{(u)} = \mathrm{softmax}\big(Q\, {K^{(u)}}^\top / \sqrt{d} + B\big)\, V^{(u)}\, W^O,\qquad
        [K^{(u)}; V^{(u)}] = \mathrm{LN}(X^{(u)})\, W^{KV}

    for every window ``u``; the window outputs are put back in place. ``Q`` is the landmark map's tokens split
    into heads, without a projection (as in the authors' code).

    Shapes: ``x`` ``[B, C, H, W]`` (image features, ``H, W`` multiples of ``window``), ``queries``
    ``[B, C, w, w]`` (landmark features) -> ``[B, C, H, W]``.

    Args:
        dim: channels ``C``.
        heads: heads ``H`` (``dim % heads == 0``).
        window: window side ``w`` (default 7).
        backend: :func:`headwise.attention` backend.

    Choices made here: :func:`headwise.attention` has no additive score bias, so the bias is folded into the
    dot product exactly: queries get a one-hot block ``e_i / scale`` and keys the bias column ``B[:, j]``
    (``w^2`` extra dimensions per head). ARBEx's residual, feed-forward and the ViT after it are left to the
    caller; its reliability balancing is :func:`reliability_balance`.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("window_cross(window=7)", dim=64, heads=4)
        >>> m(torch.randn(2, 64, 14, 14), torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64, 14, 14])
    """

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
            MultiHeadAttention.Config(dim=self.dim, heads=self.heads, backend=self.backend)  # validates backend

    def __init__(self, dim: int, heads: int, *, window: int = 7, backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, window=window, backend=backend)
        self.norm = nn.LayerNorm(dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)  # ((2w-1)^2, H)
        self.register_buffer("relative_index", relative_position_index(window), persistent=False)  # (w*w, w*w)

    def forward(self, x: Tensor, queries: Tensor) -> Tensor:
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
        k, v = self.kv_proj(win).view(-1, L, 2, Hh, D).permute(2, 0, 3, 1, 4)  # 2 x (B*nW, Hh, L, D)
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

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, heads={c.heads}, window={c.window}"


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
