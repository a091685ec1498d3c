"""BAM's soft mixture of attention experts (registered as ``"attention_experts"``).

Zhang et al., NeurIPS 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of
Experts": ``E`` full multi-head attention layers (the experts) mixed per token by a softmax router, built from
trained dense layers by :func:`upcycle_attention`. All experts' heads run as one :func:`headwise.attention` call;
:func:`naive_attention_experts` (one plain attention per expert, materialized scores) is the reference.
:func:`top_k_gates` (keep each row's ``k`` largest probabilities) is shared with ``"selective"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_positive_int, check_tokens, resolve_head_dim
from headwise.core.attention import attention
from headwise.core.reference import naive_attention
from headwise.patterns import Pattern, from_spec
from headwise.variants.base import Capabilities, Variant, check_backend, resolve_pattern, with_causal
from headwise.variants.mha import MultiHeadAttention
from headwise.variants.registry import register

__all__ = ["AttentionExperts", "upcycle_attention", "naive_attention_experts", "top_k_gates"]


def top_k_gates(probs: Tensor, k: int) -> Tensor:
    """Keep each row's ``k`` largest probabilities (last axis), renormalized to sum to ``k``; zeros elsewhere.

    ``probs`` ``[..., E]`` -> ``[..., E]``: exactly ``k`` non-zero entries per row (for positive ``probs``), so a
    uniform router gives weight 1 to each selected expert. Ties break by index (``torch.topk``).

    Example:
        >>> import torch
        >>> top_k_gates(torch.tensor([[0.1, 0.4, 0.2, 0.3]]), 2)
        tensor([[0.0000, 1.1429, 0.0000, 0.8571]])
    """
    idx = probs.topk(k, dim=-1).indices  # (..., k)
    kept = torch.zeros_like(probs).scatter(-1, idx, probs.gather(-1, idx))  # (..., E)
    return kept * (k / kept.sum(-1, keepdim=True))


def _linear_init_(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    # torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


@register("attention_experts")
class AttentionExperts(Variant):
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

    Parameters (expert ``e``'s weights are slice ``e``, laid out as :class:`torch.nn.Linear`'s
    ``(out_features, in_features)``): ``router`` (``C -> E``, no bias), ``q_weight`` ``[E, H*D, C]``,
    ``k_weight`` and ``v_weight`` ``[E, H*D, C]`` (``[H*D, C]`` with ``share_kv``), ``out_weight``
    ``[E, C, H*D]`` and the biases ``q_bias``, ``k_bias``, ``v_bias`` ``[E, H*D]`` (``[H*D]`` shared) and
    ``out_bias`` ``[E, C]``. Checkpoints with the former fused ``kv_weight`` / ``kv_bias`` (rows ``[:H*D]`` the
    keys) still load.

    Args (the fields of :class:`AttentionExperts.Config`):
        dim: model width ``C``.
        heads: heads per expert ``H``.
        experts: number of attention experts ``E`` (default 4).
        head_dim: per-head width ``D``; default ``dim // heads``.
        share_kv: share the key and value projections across experts (default False).
        topk: ``None`` (default) for BAM's soft routing over all experts; an int keeps each token's ``topk``
            largest router probabilities, renormalized to sum to 1 (every expert is still computed).
        pattern: a :class:`headwise.patterns.Pattern` or spec string restricting attention, shared by all heads;
            default full.
        causal: query ``i`` attends keys ``j <= i`` only, intersected with ``pattern`` (default False).
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

    capabilities = Capabilities(causal="optional")
    example_config = {"dim": 16, "heads": 2, "experts": 3, "topk": 2}

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # attention heads per expert H
        experts: int = 4  # number of attention experts E
        head_dim: int | None = None  # per-head width D; None: dim // heads
        share_kv: bool = False  # one key/value projection shared by all experts (BAM's KV sharing)
        topk: int | None = None  # None: soft routing over all experts (BAM); k: keep each token's k largest gates
        pattern: Pattern | str | None = None  # allowed (query, key) pairs, shared by all heads; None: all
        causal: bool = False  # query i sees keys j <= i only (intersected with pattern)
        qkv_bias: bool = True  # bias in the q, k, v projections
        out_bias: bool = True  # bias in the output projections
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            check_positive_int("experts", self.experts)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            for name in ("share_kv", "causal", "qkv_bias", "out_bias"):
                check_bool(name, getattr(self, name))
            if self.topk is not None:
                check_positive_int("topk", self.topk)
                if self.topk > self.experts:
                    raise ValueError(f"topk must be at most experts={self.experts}, got topk={self.topk}")
            if isinstance(self.pattern, str):
                self.pattern = from_spec(self.pattern)
            if isinstance(self.pattern, Pattern) and self.pattern.heads is not None:
                raise ValueError(f"attention_experts takes a pattern shared by all heads, got one with "
                                 f"{self.pattern.heads} heads ({self.pattern!r})")
            self.pattern = resolve_pattern(self.pattern)
            check_backend(self.backend)

    def build(self, cfg) -> None:
        C, E, HD = cfg.dim, cfg.experts, cfg.heads * cfg.head_dim
        self.pattern = with_causal(cfg.pattern, cfg.causal)  # the pattern every call applies
        self.router = nn.Linear(C, E, bias=False)
        # expert e's weights are slice e, laid out as torch.nn.Linear's (out_features, in_features)
        kv_rows = () if cfg.share_kv else (E,)
        self.q_weight = nn.Parameter(torch.empty(E, HD, C))  # W^Q_e
        self.k_weight = nn.Parameter(torch.empty(*kv_rows, HD, C))  # W^K_e, or the shared W^K
        self.v_weight = nn.Parameter(torch.empty(*kv_rows, HD, C))  # W^V_e, or the shared W^V
        self.out_weight = nn.Parameter(torch.empty(E, C, HD))  # W^O_e
        if cfg.qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(E, HD))
            self.k_bias = nn.Parameter(torch.empty(*kv_rows, HD))
            self.v_bias = nn.Parameter(torch.empty(*kv_rows, HD))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.out_bias = nn.Parameter(torch.empty(E, C)) if cfg.out_bias else None
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(_split_kv_weight, with_module=True)

    def reset_parameters(self) -> None:
        """``torch.nn.Linear``'s default initialisation for each expert's projections and the router."""
        cfg = self.config
        C, HD = cfg.dim, cfg.heads * cfg.head_dim
        self.router.reset_parameters()
        with torch.no_grad():
            for e in range(cfg.experts):
                _linear_init_(self.q_weight[e], None if self.q_bias is None else self.q_bias[e], C)
                _linear_init_(self.out_weight[e], None if self.out_bias is None else self.out_bias[e], HD)
                if not cfg.share_kv:
                    self._kv_init_(lambda t: t[e], C)
            if cfg.share_kv:
                self._kv_init_(lambda t: t, C)

    def _kv_init_(self, part, fan_in: int) -> None:
        """Initialise ``part`` of the key and value weights (and biases) as ONE fused ``k|v`` layer split in two:
        for a given seed, the initial weights of the former fused ``kv_weight``."""
        k_w, v_w = part(self.k_weight), part(self.v_weight)
        weight = torch.empty(2 * k_w.shape[0], k_w.shape[1], dtype=k_w.dtype, device=k_w.device)
        bias = None if self.k_bias is None else torch.empty(2 * k_w.shape[0], dtype=k_w.dtype, device=k_w.device)
        _linear_init_(weight, bias, fan_in)
        k_w.copy_(weight[: k_w.shape[0]])
        v_w.copy_(weight[k_w.shape[0]:])
        if bias is not None:
            part(self.k_bias).copy_(bias[: k_w.shape[0]])
            part(self.v_bias).copy_(bias[k_w.shape[0]:])

    def route(self, x: Tensor) -> Tensor:
        """Mixture weights ``[B, N, E]``: softmax of the router; with ``topk``, the top-k renormalized to sum to 1."""
        probs = torch.softmax(self.router(x), dim=-1)  # (B, N, E)
        if self.config.topk is None:
            return probs
        return top_k_gates(probs, self.config.topk) / self.config.topk

    def expert_projection(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Every expert's heads of one projection: ``x`` ``[B, N, C]`` and ``weight`` ``[E, H*D, C]`` ->
        ``[B, H*E, N, D]`` (head ``h`` of expert ``e`` at index ``h * E + e``); a shared ``weight`` ``[H*D, C]``
        gives ``[B, H, N, D]``."""
        B, N, C = x.shape
        H, D = self.config.heads, self.config.head_dim
        if weight.dim() == 2:  # shared by the experts
            return F.linear(x, weight, bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        E = weight.shape[0]
        t = F.linear(x, weight.reshape(E * H * D, C), None if bias is None else bias.reshape(-1))  # (B, N, E*H*D)
        return t.view(B, N, E, H, D).permute(0, 3, 2, 1, 4).reshape(B, H * E, N, D)  # (B, H*E, N, D)

    def forward(self, x: Tensor) -> Tensor:
        """Mix the experts' attention over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        cfg = self.config
        check_tokens("x", x, cfg.dim)
        B, N, C = x.shape
        E, H, D = cfg.experts, cfg.heads, cfg.head_dim
        gates = self.route(x)  # (B, N, E)
        q = self.expert_projection(x, self.q_weight, self.q_bias)  # (B, H*E, N, D)
        k = self.expert_projection(x, self.k_weight, self.k_bias)  # (B, H*E or H, N, D)
        v = self.expert_projection(x, self.v_weight, self.v_bias)  # (B, H*E or H, N, D)
        o = attention(q, k, v, self.pattern, backend=cfg.backend)  # (B, H*E, N, D)
        o = o.view(B, H, E, N, D) * gates.permute(0, 2, 1)[:, None, :, :, None]  # (B, H, E, N, D) weighted
        o = o.permute(0, 3, 2, 1, 4).reshape(B, N, E * H * D)  # (B, N, E*H*D), expert-major columns
        w_out = self.out_weight.permute(1, 0, 2).reshape(C, E * H * D)  # (C, E*H*D) = [W^O_1 ... W^O_E]
        y = F.linear(o, w_out)  # (B, N, C)
        if self.out_bias is not None:
            y = y + gates @ self.out_bias  # (B, N, C): sum_e g_e b^O_e
        return y


def _split_kv_weight(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: the former fused ``kv_weight`` ``[(E,) 2*H*D, C]`` and ``kv_bias``
    ``[(E,) 2*H*D]`` (rows ``[:H*D]`` the keys, the rest the values) become ``k_*`` and ``v_*``."""
    for old, new, dim in (("kv_weight", "weight", -2), ("kv_bias", "bias", -1)):
        fused = state_dict.pop(prefix + old, None)
        if fused is not None:
            state_dict[prefix + f"k_{new}"], state_dict[prefix + f"v_{new}"] = fused.chunk(2, dim=dim)


def naive_attention_experts(module: AttentionExperts, x: Tensor) -> Tensor:
    """Reference for :class:`AttentionExperts`: one plain multi-head attention per expert (materialized scores,
    :func:`headwise.core.naive_attention`), then the router-weighted sum. ``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
    cfg = module.config
    B, N, _ = x.shape
    H, D = cfg.heads, cfg.head_dim
    gates = module.route(x)  # (B, N, E)
    y = torch.zeros_like(x)  # (B, N, C)

    def heads(w, b):  # (B, N, C) -> (B, H, N, D)
        return F.linear(x, w, b).view(B, N, H, D).transpose(1, 2)

    def kv_slice(p, e):  # expert e's key/value weight or bias (the shared one with share_kv)
        return None if p is None else (p if cfg.share_kv else p[e])

    for e in range(cfg.experts):
        q = heads(module.q_weight[e], None if module.q_bias is None else module.q_bias[e])  # (B, H, N, D)
        k = heads(kv_slice(module.k_weight, e), kv_slice(module.k_bias, e))  # (B, H, N, D)
        v = heads(kv_slice(module.v_weight, e), kv_slice(module.v_bias, e))  # (B, H, N, D)
        o, _ = naive_attention(q, k, v, module.pattern)  # (B, H, N, D)
        out_b = None if module.out_bias is None else module.out_bias[e]
        y_e = F.linear(o.transpose(1, 2).reshape(B, N, H * D), module.out_weight[e], out_b)  # (B, N, C)
        y = y + gates[..., e : e + 1] * y_e
    return y


def upcycle_attention(
    layers: Sequence[MultiHeadAttention], *, share_kv: bool = False, topk: int | None = None
) -> AttentionExperts:
    """BAM's attention upcycling: one :class:`AttentionExperts` whose expert ``e`` is the trained dense layer
    ``layers[e]``.

    Each expert's ``W^Q, W^K, W^V, W^O`` (and biases) are copied from its dense layer (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``); with ``share_kv=True`` the shared ``W^K, W^V`` are the average of the layers'
    (BAM merges every non-expert parameter by averaging). The router is freshly initialised (as in BAM), so the
    result must be trained further; with one layer it computes exactly what that layer computes (in ``eval()``
    mode: the layers' output dropout is not carried over). The layers must be
    :class:`~headwise.variants.mha.MultiHeadAttention` modules (``"mha"``) with equal width, heads, head width,
    biases, pattern, causal mode and backend; the result has their dtype and device.

    Example:
        >>> import torch, headwise
        >>> dense = [headwise.create("mha", dim=128, heads=4) for _ in range(3)]   # e.g. three domain experts
        >>> moa = headwise.variants.attention_experts.upcycle_attention(dense, share_kv=True)
        >>> moa.config.experts, moa(torch.randn(1, 10, 128)).shape
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
        return (c.dim, c.heads, c.head_dim, c.qkv_bias, c.out_bias, repr(c.pattern), c.causal, c.backend)

    for i, m in enumerate(layers[1:], start=1):
        if signature(m.config) != signature(ref):
            raise ValueError(f"layers[{i}] does not match layers[0]: (dim, heads, head_dim, qkv_bias, out_bias, "
                             f"pattern, causal, backend) = {signature(m.config)} vs {signature(ref)}")
    first = layers[0].q_proj.weight
    moa = AttentionExperts(
        ref.dim, ref.heads, experts=len(layers), head_dim=ref.head_dim, share_kv=share_kv, topk=topk,
        pattern=ref.pattern, causal=ref.causal, qkv_bias=ref.qkv_bias, out_bias=ref.out_bias, backend=ref.backend,
    ).to(device=first.device, dtype=first.dtype)
    pairs = [(moa.q_weight, moa.q_bias, "q_proj"), (moa.out_weight, moa.out_bias, "out_proj")]
    shared = [(moa.k_weight, moa.k_bias, "k_proj"), (moa.v_weight, moa.v_bias, "v_proj")]
    with torch.no_grad():
        for weight, bias, name in pairs + ([] if share_kv else shared):
            for e, m in enumerate(layers):
                weight[e].copy_(getattr(m, name).weight)
                if bias is not None:
                    bias[e].copy_(getattr(m, name).bias)
        if share_kv:
            for weight, bias, name in shared:
                weight.copy_(torch.stack([getattr(m, name).weight for m in layers]).mean(0))
                if bias is not None:
                    bias.copy_(torch.stack([getattr(m, name).bias for m in layers]).mean(0))
    return moa
