"""Attention heads as routed experts: BAM's soft mixture of attention experts (``"attention_experts"``, with
:func:`upcycle_attention`) and Union-of-Experts' Selective Multi-Head Attention (``"selective"``).

Both modules own their projections and call :func:`headwise.attention` for every softmax attention; each has a
readable ``naive_*`` reference (materialized scores, explicit loops) that the tests hold the fast path to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise import patterns
from headwise.core.attention import BACKENDS, attention
from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Pattern
from headwise.checks import check_bool, check_positive_int
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = [
    "top_k_gates",
    "AttentionExperts",
    "upcycle_attention",
    "naive_attention_experts",
    "SelectiveAttention",
    "naive_selective_attention",
]





def _check_topk(name: str, value, upper_name: str, upper: int) -> None:
    check_positive_int(name, value)
    if value > upper:
        raise ValueError(f"{name} must be at most {upper_name}={upper}, got {name}={value}")


def _linear_init_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


def top_k_gates(probs: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest probabilities (last axis), renormalized to sum to ``k``; zeros elsewhere.

    ``probs`` ``[..., E]`` -> ``[..., E]``: exactly ``k`` non-zero entries per row (for positive ``probs``), so a
    uniform router gives weight 1 to each selected expert. Ties break by index (``torch.topk``).
    """
    idx = probs.topk(k, dim=-1).indices  # (..., k)
    kept = torch.zeros_like(probs).scatter(-1, idx, probs.gather(-1, idx))  # (..., E)
    return kept * (k / kept.sum(-1, keepdim=True))


# ---------------------------------------------------------------------------------------------------------
# BAM: soft mixture of attention experts
# ---------------------------------------------------------------------------------------------------------


@register("attention_experts")
class AttentionExperts(nn.Module):
    r"""Soft mixture of attention experts, from "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
    Mixture of Experts" (Zhang et al., NeurIPS 2024), the attention half of Branch-Attend-Mix.

    Each of the ``E`` experts is a full multi-head attention layer; a router mixes their outputs per token:

    .. math::

        g(x_n) = \mathrm{softmax}(W_r x_n) \in \mathbb{R}^E, \qquad
        y_n = \sum_{e=1}^{E} g_e(x_n)\, \mathrm{MHA}_e(x)_n,

        \mathrm{MHA}_e(x) = \mathrm{Concat}_h\big(\mathrm{softmax}(Q^e_h {K^e_h}^\top / \sqrt{D})
                            V^e_h\big) W^O_e + b^O_e

    with ``Q^e = x W^Q_e``, ``K^e = x W^K_e``, ``V^e = x W^V_e``. BAM's default is *soft* routing: every token
    uses every expert (``topk=None``). ``share_kv=True`` is BAM's KV-sharing variant: one ``W^K, W^V`` for all
    experts (each expert keeps its own ``W^Q`` and ``W^O``), so the keys and values are computed once.
    :func:`upcycle_attention` builds the mixture from trained dense attention layers, as BAM does.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``. Inside, the experts' heads run as one attention call with
    ``E * H`` query heads ``[B, H*E, N, D]`` (head ``h`` of expert ``e`` at index ``h * E + e``) over keys and
    values ``[B, H*E, N, D]``, or ``[B, H, N, D]`` with ``share_kv`` (a grouped-query call: the ``E`` experts'
    copies of head ``h`` read key/value head ``h``). The mixture weights are applied to the per-head outputs
    before one fused output projection ``[B, N, E*H*D] -> [B, N, C]``.

    Args:
        dim: model width ``C``.
        heads: heads per expert ``H``.
        experts: number of attention experts ``E`` (default 4).
        head_dim: per-head width ``D``; default ``dim // heads``.
        share_kv: share the key and value projections across experts (default False).
        topk: ``None`` (default) for BAM's soft routing over all experts; an int keeps each token's ``topk``
            largest router probabilities, renormalized to sum to 1 (every expert is still computed).
        pattern: a :class:`headwise.patterns.Pattern` or spec string restricting attention; default full.
        qkv_bias: bias in the q, k, v projections (default True).
        out_bias: bias in the output projections (default True).
        backend: :func:`headwise.attention` backend (default ``"auto"``).

    Choices made here: the router is a bias-free linear layer with softmax (BAM: "the router layers are
    initialized randomly"); no load-balancing loss, since soft routing activates every expert. With
    ``experts=1`` the module is exactly :class:`~headwise.variants.mha.MultiHeadAttention` with the same
    weights (the router's softmax over one expert is 1). ``topk`` is an addition for experiments, not BAM's
    method. BAM's parallel attention/FFN block layout is outside this module.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("attention_experts(experts=4, share_kv=True)", dim=256, heads=8)
        >>> m(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # attention heads per expert H
        experts: int = 4  # number of attention experts E
        head_dim: int | None = None  # per-head width D; None: dim // heads
        share_kv: bool = False  # one key/value projection shared by all experts (BAM's KV sharing)
        topk: int | None = None  # None: soft routing over all experts (BAM); k: keep each token's k largest gates
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projections
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            check_positive_int("experts", self.experts)
            if self.head_dim is None:
                if self.dim % self.heads:
                    raise ValueError(f"dim must be divisible by heads when head_dim is None, got dim={self.dim} "
                                     f"heads={self.heads}; pass head_dim= to choose the head width")
                self.head_dim = self.dim // self.heads
            check_positive_int("head_dim", self.head_dim)
            for name in ("share_kv", "qkv_bias", "out_bias"):
                check_bool(name, getattr(self, name))
            if self.topk is not None:
                _check_topk("topk", self.topk, "experts", self.experts)
            if isinstance(self.pattern, str):
                self.pattern = patterns.from_spec(self.pattern)
            if self.pattern is not None and not isinstance(self.pattern, Pattern):
                raise TypeError(f"pattern must be a headwise Pattern, a pattern spec string or None, "
                                f"got pattern={self.pattern!r} ({type(self.pattern).__name__})")
            if self.pattern is not None and self.pattern.heads is not None:
                raise ValueError(f"attention_experts takes a pattern shared by all heads, got one with "
                                 f"{self.pattern.heads} heads ({self.pattern!r})")
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"unknown backend={self.backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))

    _check_tokens = MultiHeadAttention._check_tokens  # the same [B, N, C] input check as MHA

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        experts: int = 4,
        head_dim: int | None = None,
        share_kv: bool = False,
        topk: int | None = None,
        pattern: Pattern | str | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        self.config = cfg = self.Config(
            dim=dim, heads=heads, experts=experts, head_dim=head_dim, share_kv=share_kv, topk=topk,
            pattern=pattern, qkv_bias=qkv_bias, out_bias=out_bias, backend=backend,
        )
        self.dim, self.heads, self.experts, self.head_dim = cfg.dim, cfg.heads, cfg.experts, cfg.head_dim
        C, E, HD = cfg.dim, cfg.experts, cfg.heads * cfg.head_dim
        self.router = nn.Linear(C, E, bias=False)
        # expert e's weights are slice e, laid out as torch.nn.Linear's (out_features, in_features)
        self.q_weight = nn.Parameter(torch.empty(E, HD, C))  # W^Q_e
        self.q_bias = nn.Parameter(torch.empty(E, HD)) if cfg.qkv_bias else None
        kv_shape = (2 * HD, C) if cfg.share_kv else (E, 2 * HD, C)  # rows [:HD] are W^K, the rest W^V
        self.kv_weight = nn.Parameter(torch.empty(kv_shape))
        self.kv_bias = nn.Parameter(torch.empty(kv_shape[:-1])) if cfg.qkv_bias else None
        self.out_weight = nn.Parameter(torch.empty(E, C, HD))  # W^O_e
        self.out_bias = nn.Parameter(torch.empty(E, C)) if cfg.out_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``torch.nn.Linear``'s default initialisation for each expert's projections and the router."""
        C, HD = self.dim, self.heads * self.head_dim
        self.router.reset_parameters()
        with torch.no_grad():
            for e in range(self.experts):
                _linear_init_(self.q_weight[e], None if self.q_bias is None else self.q_bias[e], C)
                _linear_init_(self.out_weight[e], None if self.out_bias is None else self.out_bias[e], HD)
                if not self.config.share_kv:
                    _linear_init_(self.kv_weight[e], None if self.kv_bias is None else self.kv_bias[e], C)
            if self.config.share_kv:
                _linear_init_(self.kv_weight, self.kv_bias, C)

    def route(self, x: Tensor) -> Tensor:
        """Mixture weights ``[B, N, E]``: softmax of the router; with ``topk``, the top-k renormalized to sum to 1."""
        probs = torch.softmax(self.router(x), dim=-1)  # (B, N, E)
        if self.config.topk is None:
            return probs
        return top_k_gates(probs, self.config.topk) / self.config.topk

    def forward(self, x: Tensor) -> Tensor:
        """Mix the experts' attention over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        self._check_tokens("x", x)
        B, N, C = x.shape
        E, H, D = self.experts, self.heads, self.head_dim
        gates = self.route(x)  # (B, N, E)
        q_b = None if self.q_bias is None else self.q_bias.reshape(-1)
        q = F.linear(x, self.q_weight.reshape(E * H * D, C), q_b)  # (B, N, E*H*D)
        q = q.view(B, N, E, H, D).permute(0, 3, 2, 1, 4).reshape(B, H * E, N, D)  # (B, H*E, N, D)
        if self.config.share_kv:
            kv = F.linear(x, self.kv_weight, self.kv_bias)  # (B, N, 2*H*D)
            k, v = kv.view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, D)
        else:
            kv_b = None if self.kv_bias is None else self.kv_bias.reshape(-1)
            kv = F.linear(x, self.kv_weight.reshape(E * 2 * H * D, C), kv_b)  # (B, N, E*2*H*D)
            kv = kv.view(B, N, E, 2, H, D).permute(3, 0, 4, 2, 1, 5)  # (2, B, H, E, N, D)
            k, v = kv.reshape(2, B, H * E, N, D)  # 2 x (B, H*E, N, D)
        o = attention(q, k, v, self.config.pattern, backend=self.config.backend)  # (B, H*E, N, D)
        o = o.view(B, H, E, N, D) * gates.permute(0, 2, 1)[:, None, :, :, None]  # (B, H, E, N, D) weighted
        o = o.permute(0, 3, 2, 1, 4).reshape(B, N, E * H * D)  # (B, N, E*H*D), expert-major columns
        w_out = self.out_weight.permute(1, 0, 2).reshape(C, E * H * D)  # (C, E*H*D) = [W^O_1 ... W^O_E]
        y = F.linear(o, w_out)  # (B, N, C)
        if self.out_bias is not None:
            y = y + gates @ self.out_bias  # (B, N, C): sum_e g_e b^O_e
        return y

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, experts={c.experts}, head_dim={c.head_dim}, "
                f"share_kv={c.share_kv}, topk={c.topk}, pattern={c.pattern!r}")


def naive_attention_experts(module: AttentionExperts, x: Tensor) -> Tensor:
    """Reference for :class:`AttentionExperts`: one plain multi-head attention per expert (materialized scores,
    :func:`headwise.core.naive_attention`), then the router-weighted sum. ``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
    B, N, C = x.shape
    H, D = module.heads, module.head_dim
    gates = module.route(x)  # (B, N, E)
    y = torch.zeros_like(x)  # (B, N, C)
    for e in range(module.experts):
        kv_w = module.kv_weight if module.config.share_kv else module.kv_weight[e]  # (2*H*D, C)
        kv_b = None if module.kv_bias is None else (module.kv_bias if module.config.share_kv else module.kv_bias[e])
        q = F.linear(x, module.q_weight[e], None if module.q_bias is None else module.q_bias[e])  # (B, N, H*D)
        k, v = F.linear(x, kv_w, kv_b).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, D)
        o, _ = naive_attention(q.view(B, N, H, D).transpose(1, 2), k, v, module.config.pattern)  # (B, H, N, D)
        out_b = None if module.out_bias is None else module.out_bias[e]
        y_e = F.linear(o.transpose(1, 2).reshape(B, N, H * D), module.out_weight[e], out_b)  # (B, N, C)
        y = y + gates[..., e : e + 1] * y_e
    return y


def upcycle_attention(
    layers: Sequence[MultiHeadAttention], *, share_kv: bool = False, topk: int | None = None
) -> AttentionExperts:
    """BAM's attention upcycling: one :class:`AttentionExperts` whose expert ``e`` is the trained dense layer
    ``layers[e]``.

    Each expert's ``W^Q, W^K, W^V, W^O`` (and biases) are copied from its dense layer; with ``share_kv=True`` the
    shared ``W^K, W^V`` are the average of the layers' (BAM merges every non-expert parameter by averaging). The
    router is freshly initialised (as in BAM), so the result must be trained further; with one layer it computes
    exactly what that layer computes. The layers must be :class:`~headwise.variants.mha.MultiHeadAttention`
    modules (``"mha"``) with equal width, heads, head width, biases, pattern and backend; the result has their
    dtype and device.

    Example:
        >>> import torch, headwise
        >>> dense = [headwise.create("mha", dim=128, heads=4) for _ in range(3)]   # e.g. three domain experts
        >>> moa = headwise.variants.experts.upcycle_attention(dense, share_kv=True)
        >>> moa.experts, moa(torch.randn(1, 10, 128)).shape
        (3, torch.Size([1, 10, 128]))
    """
    layers = list(layers)
    if not layers:
        raise ValueError("layers must hold at least one trained attention layer, got an empty sequence")
    for i, m in enumerate(layers):
        if not isinstance(m, MultiHeadAttention):
            raise TypeError(f"layers[{i}] must be a headwise MultiHeadAttention ('mha'), got {type(m).__name__}")
        if m.kv_heads != m.heads:
            raise ValueError(f"layers[{i}] has kv_heads={m.kv_heads} != heads={m.heads}; upcycling needs plain "
                             f"MHA layers (one key/value head per query head)")
    ref = layers[0].config

    def signature(c):
        return (c.dim, c.heads, c.head_dim, c.qkv_bias, c.out_bias, repr(c.pattern), c.backend)

    for i, m in enumerate(layers[1:], start=1):
        if signature(m.config) != signature(ref):
            raise ValueError(f"layers[{i}] does not match layers[0]: (dim, heads, head_dim, qkv_bias, out_bias, "
                             f"pattern, backend) = {signature(m.config)} vs {signature(ref)}")
    first = layers[0].q_proj.weight
    moa = AttentionExperts(
        ref.dim, ref.heads, experts=len(layers), head_dim=ref.head_dim, share_kv=share_kv, topk=topk,
        pattern=ref.pattern, qkv_bias=ref.qkv_bias, out_bias=ref.out_bias, backend=ref.backend,
    ).to(device=first.device, dtype=first.dtype)
    with torch.no_grad():
        for e, m in enumerate(layers):
            moa.q_weight[e].copy_(m.q_proj.weight)
            moa.out_weight[e].copy_(m.out_proj.weight)
            if moa.q_bias is not None:
                moa.q_bias[e].copy_(m.q_proj.bias)
            if moa.out_bias is not None:
                moa.out_bias[e].copy_(m.out_proj.bias)
            if not share_kv:
                moa.kv_weight[e].copy_(m.kv_proj.weight)
                if moa.kv_bias is not None:
                    moa.kv_bias[e].copy_(m.kv_proj.bias)
        if share_kv:
            moa.kv_weight.copy_(torch.stack([m.kv_proj.weight for m in layers]).mean(0))
            if moa.kv_bias is not None:
                moa.kv_bias.copy_(torch.stack([m.kv_proj.bias for m in layers]).mean(0))
    return moa


# ---------------------------------------------------------------------------------------------------------
# Union of Experts: Selective Multi-Head Attention
# ---------------------------------------------------------------------------------------------------------


@register("selective")
class SelectiveAttention(nn.Module):
    r"""Selective Multi-Head Attention (SMHA) from "Union of Experts: Adapting Hierarchical Routing to
    Equivalently Decomposed Transformer" (Yang et al., 2025): the heads of one multi-head attention layer are
    the experts, and two routers decide which head processes which data.

    * Expert selection (per sequence): ``G = softmax(W_e \bar{x})`` over the ``H`` heads from the mean token
      ``\bar{x}``; the ``expert_topk`` largest are kept, renormalized to sum to ``expert_topk``, the other heads
      are not computed for that sequence.
    * Patch-wise data selection (per token): ``g_n = softmax(W_d x_n)`` over the heads; each token keeps its
      ``topk`` largest, renormalized to sum to ``topk``. Head ``h`` then runs softmax attention among *only* the
      tokens ``S_h = {n : g_{n,h} > 0}`` that selected it (queries and keys both; ``causal`` keeps the original
      order).

    .. math::

        y_n = \sum_{h:\, n \in S_h} G_h\, g_{n,h}\; \mathrm{softmax}_{j \in S_h}\!\big(q^h_n \cdot k^h_j / \sqrt{D}\big)
        \, V^h_{S_h} \, W^O_h \; + b^O

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; q, k, v ``[B, H, N, D]``; head ``h`` of sequence ``b``
    attends over the gathered ``[1, 1, |S_h|, D]`` (one :func:`headwise.attention` call per active (sequence,
    head)), so its cost falls with ``|S_h|^2``: with ``topk = H / 2`` about a quarter of MHA's attention FLOPs.

    Args:
        dim: model width ``C``.
        heads: number of heads (experts) ``H``.
        head_dim: per-head width ``D``; default ``dim // heads``.
        topk: heads each token selects; default ``heads // 2`` (UoE's gate), at least 1.
        expert_topk: heads each sequence selects; default ``heads`` (every head).
        causal: causal attention inside each head's selected tokens (default False).
        qkv_bias: bias in the q, k, v projections (default True).
        out_bias: bias in the output projection (default True).

    Choices made here (the paper and its code leave them open): the gate values weight the head outputs, which
    trains the routers (UoE's public code uses the gates only to select); selected gates are renormalized to sum
    to ``k`` rather than UoE's capacity factor, so a uniform router with ``topk = expert_topk = heads`` is
    exactly MHA; tokens are the "patches" (UoE: patch size = one embedding); the expert-selection router pools
    the whole sequence, which would leak future tokens into a causal model, so with ``causal=True`` it pools the
    prefix instead: token ``n``'s head gates come from the mean of ``x_1 .. x_n``, and head ``h`` keeps token
    ``n`` only if both routers selected ``h`` for it (tested: outputs before ``t`` do not depend on tokens at or
    after ``t``). No load-balancing loss.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("selective(topk=4)", dim=256, heads=8)
        >>> m(torch.randn(2, 100, 256)).shape
        torch.Size([2, 100, 256])
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H, each one an expert
        head_dim: int | None = None  # per-head width D; None: dim // heads
        topk: int | None = None  # heads each token selects (patch-wise data selection); None: max(1, heads // 2)
        expert_topk: int | None = None  # heads each sequence selects (expert selection); None: heads
        causal: bool = False  # causal attention among each head's selected tokens
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projection

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.head_dim is None:
                if self.dim % self.heads:
                    raise ValueError(f"dim must be divisible by heads when head_dim is None, got dim={self.dim} "
                                     f"heads={self.heads}; pass head_dim= to choose the head width")
                self.head_dim = self.dim // self.heads
            check_positive_int("head_dim", self.head_dim)
            if self.topk is None:
                self.topk = max(1, self.heads // 2)
            _check_topk("topk", self.topk, "heads", self.heads)
            if self.expert_topk is None:
                self.expert_topk = self.heads
            _check_topk("expert_topk", self.expert_topk, "heads", self.heads)
            for name in ("causal", "qkv_bias", "out_bias"):
                check_bool(name, getattr(self, name))

    _check_tokens = MultiHeadAttention._check_tokens  # the same [B, N, C] input check as MHA

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        head_dim: int | None = None,
        topk: int | None = None,
        expert_topk: int | None = None,
        causal: bool = False,
        qkv_bias: bool = True,
        out_bias: bool = True,
    ):
        super().__init__()
        self.config = cfg = self.Config(
            dim=dim, heads=heads, head_dim=head_dim, topk=topk, expert_topk=expert_topk, causal=causal,
            qkv_bias=qkv_bias, out_bias=out_bias,
        )
        self.dim, self.heads, self.head_dim = cfg.dim, cfg.heads, cfg.head_dim
        HD = cfg.heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, HD, bias=cfg.qkv_bias)  # same layout as MultiHeadAttention
        self.kv_proj = nn.Linear(cfg.dim, 2 * HD, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(HD, cfg.dim, bias=cfg.out_bias)
        self.token_router = nn.Linear(cfg.dim, cfg.heads)  # W_d: patch-wise data selection
        self.expert_router = nn.Linear(cfg.dim, cfg.heads)  # W_e: expert selection per sequence

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(token_gates [B, N, H], head_gates)``: exactly ``topk`` (``expert_topk``) non-zero gates per token
        (sequence), each row summing to ``topk`` (``expert_topk``). ``head_gates`` is ``[B, H]`` (one per sequence)
        or, with ``causal=True``, ``[B, N, H]`` (one per prefix)."""
        g = top_k_gates(torch.softmax(self.token_router(x), dim=-1), self.config.topk)  # (B, N, H)
        if self.config.causal:  # prefix means: no future token reaches a gate
            count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]  # (N, 1)
            pooled = x.cumsum(1) / count  # (B, N, C)
        else:
            pooled = x.mean(1)  # (B, C)
        G = top_k_gates(torch.softmax(self.expert_router(pooled), dim=-1), self.config.expert_topk)  # (B, [N,] H)
        return g, G

    @staticmethod
    def _weights(g: Tensor, G: Tensor) -> Tensor:
        """``G_h g_{n,h}`` ``[B, N, H]``: zero where the token or its sequence / prefix did not select the head."""
        return g * (G if G.dim() == 3 else G[:, None, :])

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k, v = self.kv_proj(x).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, D)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        """Route and attend over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        self._check_tokens("x", x)
        B, N, _ = x.shape
        H, D = self.heads, self.head_dim
        g, G = self.route(x)  # (B, N, H), (B, H)
        q, k, v = self._qkv(x)  # 3 x (B, H, N, D)
        pattern = Causal() if self.config.causal else None
        weight = self._weights(g, G)  # (B, N, H): zero where a head is not selected
        parts, rows = [], []
        # per-(b, h) views by unbind: one backward node per tensor (indexing q[b, h] in the loop made every
        # backward step allocate a zero tensor of q's full size)
        qs, ks, vs = ([t.unbind(0) for t in x_.unbind(0)] for x_ in (q, k, v))
        for b in range(B):
            for h in weight[b].any(0).nonzero().flatten().tolist():
                idx = weight[b, :, h].nonzero().flatten()  # (S,) the tokens head h selected, in order
                if idx.numel() == 0:
                    continue
                q_s, k_s, v_s = (t[b][h].index_select(0, idx)[None, None] for t in (qs, ks, vs))  # (1, 1, S, D)
                o = attention(q_s, k_s, v_s, pattern)  # (1, 1, S, D)
                parts.append(o[0, 0] * weight[b, idx, h, None])  # (S, D)
                rows.append(torch.stack([torch.full_like(idx, b), torch.full_like(idx, h), idx]))  # (3, S)
        out = q.new_zeros(B, H, N, D)  # (B, H, N, D): zero where (token, head) was not selected
        if parts:
            b_i, h_i, n_i = torch.cat(rows, dim=1)  # 3 x (sum S,)
            out = out.index_put((b_i, h_i, n_i), torch.cat(parts))
        return self.out_proj(out.transpose(1, 2).reshape(B, N, H * D))  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, topk={c.topk}, "
                f"expert_topk={c.expert_topk}, causal={c.causal}")


def naive_selective_attention(module: SelectiveAttention, x: Tensor) -> Tensor:
    """Reference for :class:`SelectiveAttention`: every head computed densely with a materialized
    ``[B, H, N, N]`` mask that keeps a (query, key) pair only when both tokens selected the head; rows of
    unselected tokens give zero; outputs weighted by ``G_h g_{n,h}``. ``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
    B, N, _ = x.shape
    H, D = module.heads, module.head_dim
    g, G = module.route(x)  # (B, N, H), (B, [N,] H)
    q, k, v = module._qkv(x)  # 3 x (B, H, N, D)
    weight = module._weights(g, G).transpose(1, 2)  # (B, H, N)
    sel = weight > 0  # (B, H, N)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, N, N)
    keep = sel[..., :, None] & sel[..., None, :]  # (B, H, N, N)
    if module.config.causal:
        keep = keep & torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    out = (p @ v) * weight[..., None]  # (B, H, N, D)
    return module.out_proj(out.transpose(1, 2).reshape(B, N, H * D))  # (B, N, C)
