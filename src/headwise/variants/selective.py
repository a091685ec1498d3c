"""Union of Experts' Selective Multi-Head Attention (registered as ``"selective"``).

Yang et al., 2025, "Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer": the
heads of one multi-head attention layer are the experts; a per-sequence router picks the heads a sequence uses
and a per-token router the heads each token joins, and every head attends among its own tokens only (one
:func:`headwise.attention` call per active (sequence, head)). :func:`naive_selective_attention` (every head dense
with a materialized selection mask) is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_positive_int
from headwise.core.attention import attention
from headwise.core.reference import masked_softmax
from headwise.patterns import Causal
from headwise.variants.attention_experts import top_k_gates
from headwise.variants.base import Capabilities, ProjectedAttention
from headwise.variants.registry import register

__all__ = ["SelectiveAttention", "naive_selective_attention"]


def _check_at_most(name: str, value, upper_name: str, upper: int) -> None:
    check_positive_int(name, value)
    if value > upper:
        raise ValueError(f"{name} must be at most {upper_name}={upper}, got {name}={value}")


@register("selective")
class SelectiveAttention(ProjectedAttention):
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

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; q ``[B, H, N, D]``, k, v ``[B, H_kv, N, D]``; head ``h`` of
    sequence ``b`` attends over the gathered ``[1, 1, |S_h|, D]`` (one :func:`headwise.attention` call per active
    (sequence, head)), so its cost falls with ``|S_h|^2``: with ``topk = H / 2`` about a quarter of MHA's
    attention FLOPs. Weights: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` as in MHA, plus the routers
    ``token_router`` (``W_d``) and ``expert_router`` (``W_e``), ``C -> H`` each.

    Args (the fields of :class:`SelectiveAttention.Config`, besides the projections' ``dim``, ``heads``,
    ``kv_heads``, ``head_dim``, ``qkv_bias``, ``out_bias``, ``dropout``):
        topk: heads each token selects; default ``heads // 2`` (UoE's gate), at least 1.
        expert_topk: heads each sequence selects; default ``heads`` (every head).
        causal: causal attention inside each head's selected tokens, prefix-pooled expert gates (default False).

    Choices made here (the paper and its code leave them open): the gate values weight the head outputs, which
    trains the routers (UoE's public code uses the gates only to select); selected gates are renormalized to sum
    to ``k`` rather than UoE's capacity factor, so a uniform router with ``topk = expert_topk = heads`` is
    exactly MHA; tokens are the "patches" (UoE: patch size = one embedding); the expert-selection router pools
    the whole sequence, which would leak future tokens into a causal model, so with ``causal=True`` it pools the
    prefix instead: token ``n``'s head gates come from the mean of ``x_1 .. x_n``, and head ``h`` keeps token
    ``n`` only if both routers selected ``h`` for it (tested: outputs before ``t`` do not depend on tokens at or
    after ``t``). With ``kv_heads < heads`` (an extension) query head ``h`` reads key/value head
    ``h // (heads / kv_heads)`` among its own tokens. No load-balancing loss.

    Speed: one attention call per active (sequence, head) makes a training step about 10x slower than MHA's at
    small ``N`` (an open problem).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("selective(topk=2, expert_topk=3)", dim=128, heads=4)
        >>> m(torch.randn(2, 100, 128)).shape
        torch.Size([2, 100, 128])
    """

    capabilities = Capabilities(causal="optional", weights="method")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "topk": 2, "expert_topk": 3}

    @dataclass
    class Config(ProjectedAttention.Config):
        topk: int | None = None  # heads each token selects (patch-wise data selection); None: max(1, heads // 2)
        expert_topk: int | None = None  # heads each sequence selects (expert selection); None: heads
        causal: bool = False  # causal attention among each head's selected tokens, prefix-pooled expert gates

        def __post_init__(self):
            super().__post_init__()
            if self.topk is None:
                self.topk = max(1, self.heads // 2)
            _check_at_most("topk", self.topk, "heads", self.heads)
            if self.expert_topk is None:
                self.expert_topk = self.heads
            _check_at_most("expert_topk", self.expert_topk, "heads", self.heads)
            check_bool("causal", self.causal)

    def build(self, cfg) -> None:
        super().build(cfg)
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
    def head_weights(g: Tensor, G: Tensor) -> Tensor:
        """``G_h g_{n,h}`` ``[B, N, H]`` from :meth:`route`'s gates: zero where the token or its sequence / prefix
        did not select the head."""
        return g * (G if G.dim() == 3 else G[:, None, :])

    def forward(self, x: Tensor) -> Tensor:
        """Route and attend over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        q, k, v = self.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        return self.finish(self.attend_selected(q, k, v, self.head_weights(*self.route(x))))  # (B, N, C)

    def attend_selected(self, q: Tensor, k: Tensor, v: Tensor, weight: Tensor) -> Tensor:
        """The attention step: head ``h`` attends among the tokens with ``weight[:, n, h] > 0`` and its outputs
        are scaled by that weight. ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, N, D]``, ``weight``
        ``[B, N, H]`` -> ``[B, H, N, D]`` (zero where a (token, head) was not selected)."""
        B, H, N, D = q.shape
        group = H // k.shape[1]
        pattern = Causal() if self.config.causal else None
        parts, rows = [], []
        # per-(b, h) views by unbind: one backward node per tensor (indexing q[b, h] in the loop made every
        # backward step allocate a zero tensor of q's full size)
        qs, ks, vs = ([t.unbind(0) for t in x_.unbind(0)] for x_ in (q, k, v))
        for b in range(B):
            for h in weight[b].any(0).nonzero().flatten().tolist():
                idx = weight[b, :, h].nonzero().flatten()  # (S,) the tokens head h selected, in order
                if idx.numel() == 0:
                    continue
                q_s = qs[b][h].index_select(0, idx)[None, None]  # (1, 1, S, D)
                k_s, v_s = (t[b][h // group].index_select(0, idx)[None, None] for t in (ks, vs))  # (1, 1, S, D)
                o = attention(q_s, k_s, v_s, pattern)  # (1, 1, S, D)
                parts.append(o[0, 0] * weight[b, idx, h, None])  # (S, D)
                rows.append(torch.stack([torch.full_like(idx, b), torch.full_like(idx, h), idx]))  # (3, S)
        out = q.new_zeros(B, H, N, D)  # (B, H, N, D): zero where (token, head) was not selected
        if parts:
            b_i, h_i, n_i = torch.cat(rows, dim=1)  # 3 x (sum S,)
            out = out.index_put((b_i, h_i, n_i), torch.cat(parts))
        return out

    def attention_weights(self, x: Tensor) -> Tensor:
        """The attention probabilities ``[B, H, N, N]`` over ``x`` ``[B, N, C]``: row ``n`` of head ``h`` is the
        softmax over the tokens head ``h`` selected (zeros off them), and all zeros where token ``n`` did not
        select the head (the output weights ``G_h g_{n,h}`` are not applied)."""
        q, k, _ = self.project(x)
        return _selected_probs(q, k, self.head_weights(*self.route(x)), self.config.causal)


def _selected_probs(q: Tensor, k: Tensor, weight: Tensor, causal: bool) -> Tensor:
    """Materialized probabilities ``[B, H, N, N]`` of :meth:`SelectiveAttention.attend_selected`: a (query, key)
    pair is kept only when both tokens selected the head (``weight`` ``[B, N, H]`` > 0), and ``j <= i`` when
    ``causal``; rows with no kept key are zeros."""
    _, H, N, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, N, D)
    sel = weight.transpose(1, 2) > 0  # (B, H, N)
    keep = sel[..., :, None] & sel[..., None, :]  # (B, H, N, N)
    if causal:
        keep = keep & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, N, N)
    return masked_softmax(s, keep)[0]  # (B, H, N, N), empty rows -> 0


def naive_selective_attention(module: SelectiveAttention, x: Tensor) -> Tensor:
    """Reference for :class:`SelectiveAttention`: every head computed densely with a materialized
    ``[B, H, N, N]`` mask that keeps a (query, key) pair only when both tokens selected the head; rows of
    unselected tokens give zero; outputs weighted by ``G_h g_{n,h}``. ``x`` ``[B, N, C]`` -> ``[B, N, C]``.
    The output dropout is not applied (compare in ``eval()`` mode)."""
    B, N, _ = x.shape
    H, H_kv, D = module.heads, module.kv_heads, module.head_dim
    q = F.linear(x, module.q_proj.weight, module.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    k = F.linear(x, module.k_proj.weight, module.k_proj.bias).view(B, N, H_kv, D).transpose(1, 2)  # (B, H_kv, N, D)
    v = F.linear(x, module.v_proj.weight, module.v_proj.bias).view(B, N, H_kv, D).transpose(1, 2)  # (B, H_kv, N, D)
    weight = module.head_weights(*module.route(x))  # (B, N, H)
    p = _selected_probs(q, k, weight, module.config.causal)  # (B, H, N, N)
    out = (p @ v.repeat_interleave(H // H_kv, dim=1)) * weight.transpose(1, 2)[..., None]  # (B, H, N, D)
    return F.linear(out.transpose(1, 2).reshape(B, N, H * D), module.out_proj.weight, module.out_proj.bias)
