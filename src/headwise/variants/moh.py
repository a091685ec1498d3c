"""MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yuan, Yan, 2024), and the ReLU-routed MoH of
PVChat (Shi et al., 2025) built on it (registered as ``"moh"`` and ``"relu_moh"``).

Both sum the heads of multi-head attention with per-token weights from a router: :class:`MixtureOfHeadsAttention`
(shared heads plus top-k routed heads, with the parameter-free router used to convert a trained MHA) and
:class:`ReLUMixtureOfHeadsAttention` (a ReLU router, a variable number of heads per token). Their attention step is
the head mixture of :mod:`headwise.ops.head_mixture`: the gather path (a routed head computed only for the tokens
that selected it) and its reference, the dense mixture (every head for every token, then masked); both call
:func:`headwise.attention`, so every pattern and backend applies. The module references, written out from the
papers' equations with the modules' own weights, are :func:`naive_moh` and :func:`naive_relu_moh`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_choice, check_number, is_number
from headwise.core.reference import naive_attention
from headwise.ops.head_mixture import dense_head_mixture, gather_head_mixture
from headwise.variants.base import Capabilities, SoftmaxAttention, naive_projections
from headwise.variants.mha import MultiHeadAttention
from headwise.variants.registry import register

__all__ = ["MixtureOfHeadsAttention", "ReLUMixtureOfHeadsAttention", "naive_moh", "naive_relu_moh", "naive_topk_mask"]

COMPUTE = ("sparse", "dense")  # how the head mixture runs: the gather path, or every head then masked


class _RoutedHeads(SoftmaxAttention):
    """Projected attention whose heads are summed with per-token weights from a router.

    The projections and the pattern (``pattern`` & ``causal``) are those of :class:`SoftmaxAttention`; subclasses
    implement :meth:`route`. :meth:`mix` is the attention step (:mod:`headwise.ops.head_mixture`); the inherited
    :meth:`attend` is plain per-head attention, every head for every token, ungated. After each forward,
    ``aux_loss`` (a scalar tensor: the router's regulariser), ``head_gates`` ``[B, N, H]`` (detached weights)
    and ``head_active`` ``[B, N, H]`` (bool, the heads each token computed) hold the routing of that call.
    """

    capabilities = Capabilities(causal="optional", context=True)  # the step is a routed mixture, not softmax

    def build(self, cfg) -> None:
        super().build(cfg)
        self.aux_loss, self.head_gates, self.head_active = torch.zeros(()), None, None

    def route(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(gates [B, N, H], active [B, N, H] bool, aux_loss [])`` for tokens ``x`` ``[B, N, C]`` and their
        queries ``q`` ``[B, H, N, D]``."""
        raise NotImplementedError

    def mix(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, active: Tensor) -> Tensor:
        """The attention step: heads ``q`` ``[B, H, N, D]``, ``k``, ``v`` ``[B, H_kv, M, D]`` summed with ``gates``
        where ``active`` (both ``[B, N, H]``) -> ``[B, N, H, D]``, token-major."""
        mixture = gather_head_mixture if self.config.compute == "sparse" else dense_head_mixture
        return mixture(q, k, v, gates, active, self.pattern, backend=self.backend)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Route each token of ``x`` ``[B, N, C]`` to its heads and attend to ``context`` ``[B, M, C]`` (``x``
        itself when None); returns ``[B, N, C]``."""
        q, k, v = self.project(x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        B, N, _ = x.shape
        gates, active, self.aux_loss = self.route(x, q)  # (B, N, H), (B, N, H), ()
        self.head_gates, self.head_active = gates.detach(), active
        out = self.mix(q, k, v, gates, active)  # (B, N, H, D)
        # token-major already: merge the heads without finish()'s transpose
        return self.dropout(self.out_proj(out.reshape(B, N, -1)))  # (B, N, C)


@register("moh")
class MixtureOfHeadsAttention(_RoutedHeads):
    r"""Mixture-of-Head attention (MoH; Jin, Zhu, Yuan, Yan, 2024, "MoH: Multi-Head Attention as Mixture-of-Head
    Attention").

    Multi-head attention written as a sum over heads, ``MHA(x) = sum_h head_h(x) W^O_h``, becomes a per-token
    weighted sum over a subset of heads, ``MoH(x_t) = sum_h g_{t,h} head_h(x_t) W^O_h``. The first ``h_s =
    shared_heads`` heads are always active; each token picks ``k = topk`` of the ``E = H - h_s`` routed heads:

    .. math::

        p_t = \mathrm{softmax}(W_r x_t) \in \mathbb{R}^E,\qquad
        \tilde g_{t,i} = k\,\frac{p_{t,i}\,[i \in \mathrm{TopK}(p_t)]}{\sum_{j \in \mathrm{TopK}(p_t)} p_{t,j}}

        s_t = h_s\,\mathrm{softmax}(W_s x_t) \in \mathbb{R}^{h_s},\qquad
        [\alpha_1, \alpha_2] = 2\,\mathrm{softmax}(W_h x_t)

        g_t = [\alpha_1 s_t,\; \alpha_2 \tilde g_t]

    The load-balance loss of the routed heads, over the ``T = B N`` tokens of the call, is on ``aux_loss``:

    .. math::

        \mathcal{L}_b = E \sum_{i=1}^{E} f_i P_i,\quad f_i = \tfrac1T \sum_t [i \in \mathrm{TopK}(p_t)],\quad
        P_i = \tfrac1T \sum_t p_{t,i}

    (the paper trains with ``L_task + beta L_b``, ``beta = 0.01``; add ``beta * module.aux_loss`` to the loss).

    ``router="norm"`` is the parameter-free router the paper uses to continue-tune a trained MHA into MoH
    (MoH-LLaMA3): routed head ``i`` is scored by the norm of its query, ``||q_{t,i}||``, the top ``k`` are
    active with weight 1 and the shared heads have weight 1 (``aux_loss`` is then the same statistic with
    ``p_t = softmax(||q_t|| / std_i ||q_{t,i}||)``; it has no router to train). :meth:`from_mha` builds it from
    a :class:`~headwise.variants.mha.MultiHeadAttention`; with ``topk`` equal to the routed heads it computes
    exactly that MHA.

    ``compute="sparse"`` (default) runs :func:`~headwise.ops.head_mixture.gather_head_mixture`: a routed head is
    computed only for the tokens that selected it. ``compute="dense"`` runs
    :func:`~headwise.ops.head_mixture.dense_head_mixture` (every head, then masked); the two agree. The module
    reference is :func:`naive_moh`.

    Shapes: ``x`` ``[B, N, C]`` (and ``context`` ``[B, M, C]``) -> ``[B, N, C]``; inside, q ``[B, H, N, D]``,
    k, v ``[B, H_kv, M, D]``, gates ``[B, N, H]``.

    Args (beyond those of :class:`~headwise.variants.base.SoftmaxAttention`: dim, heads, kv_heads, head_dim,
    qkv_bias, out_bias, dropout, pattern, causal, backend):
        shared_heads: always-active heads ``h_s`` (the first ones); default ``heads // 2``.
        topk: routed heads each token activates, ``1 <= k <= heads - shared_heads`` (0 when every head is
            shared); default half the routed heads, rounded up. (Formerly ``top_k``.)
        router: ``"learned"`` (default; ``W_r``, ``W_s``, ``W_h`` as above) or ``"norm"`` (parameter-free).
        compute: ``"sparse"`` (default) or ``"dense"``.

    Choices made here (from the authors' code, SkyworkAI/MoH, where the paper's equations leave the scaling
    open): the routed weights are renormalised over the top-k and scaled by ``k``, the shared ones scaled by
    ``h_s`` (a single shared head has weight 1, no ``W_s``), and ``[alpha_1, alpha_2]`` by 2, so that every
    weight averages 1 as in MHA; ``W_h`` exists only when there are both shared and routed heads; the routers
    have no bias and the default :class:`torch.nn.Linear` initialisation; ``L_b`` carries the factor ``E`` of
    that code. Patterns apply to every head; the norm router's weights are binary as in MoH-LLaMA3. No
    ``key_padding_mask`` (use a pattern).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("moh(shared_heads=2, topk=3)", dim=64, heads=8)
        >>> y = m(torch.randn(2, 100, 64))                      # [B, N, C]
        >>> loss = y.square().mean() + 0.01 * m.aux_loss
        >>> int(m.head_active.sum(-1).unique())                 # 2 shared + 3 routed heads per token
        5
    """

    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "shared_heads": 1, "topk": 2}
    aliases = {"top_k": "topk"}

    @dataclass
    class Config(SoftmaxAttention.Config):
        shared_heads: int | None = None  # always-active heads h_s (the first ones); None: heads // 2
        topk: int | None = None  # routed heads per token, 1..heads-shared_heads (0 if none); None: half, rounded up
        router: str = "learned"  # "learned" (softmax top-k router) or "norm" (parameter-free, by query norm)
        compute: str = "sparse"  # "sparse": compute a routed head only for its tokens; "dense": all, then mask

        def __post_init__(self):
            super().__post_init__()
            if self.shared_heads is None:
                self.shared_heads = self.heads // 2
            if isinstance(self.shared_heads, bool) or not isinstance(self.shared_heads, int) \
                    or not 0 <= self.shared_heads <= self.heads:
                raise ValueError(f"shared_heads must be an int in [0, heads={self.heads}], got shared_heads={self.shared_heads!r}")
            routed = self.heads - self.shared_heads
            if self.topk is None:
                self.topk = (routed + 1) // 2
            if isinstance(self.topk, bool) or not isinstance(self.topk, int):
                raise TypeError(f"topk must be an int, got topk={self.topk!r}")
            if self.topk > routed:
                raise ValueError(f"topk={self.topk} exceeds the {routed} routed heads "
                                 f"(heads={self.heads} - shared_heads={self.shared_heads})")
            if routed and self.topk < 1:
                raise ValueError(f"topk must be at least 1 with {routed} routed heads, got topk={self.topk}")
            if not routed and self.topk != 0:
                raise ValueError(f"every head is shared (shared_heads={self.shared_heads}), so topk must be 0, got topk={self.topk}")
            check_choice("router", self.router, ("learned", "norm"))
            check_choice("compute", self.compute, COMPUTE)

    def build(self, cfg) -> None:
        super().build(cfg)
        routed = cfg.heads - cfg.shared_heads
        learned = cfg.router == "learned"
        self.router = nn.Linear(cfg.dim, routed, bias=False) if learned and routed else None  # W_r
        self.shared_router = nn.Linear(cfg.dim, cfg.shared_heads, bias=False) if learned and cfg.shared_heads > 1 else None  # W_s
        self.mix_router = nn.Linear(cfg.dim, 2, bias=False) if learned and routed and cfg.shared_heads else None  # W_h

    @classmethod
    def from_mha(cls, mha: MultiHeadAttention, **config) -> MixtureOfHeadsAttention:
        """MoH with the projections of a trained :class:`~headwise.variants.mha.MultiHeadAttention` (also GQA/MQA)
        copied in (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

        The paper's conversion (MoH-LLaMA3) keeps the weights and routes by query norm (``router="norm"``,
        default) before continue-tuning; ``router="learned"`` adds freshly initialised routers instead. The
        result has ``mha``'s dim, heads, kv_heads, head_dim, pattern, causal, biases, dropout, backend, dtype and
        device; ``config`` gives the MoH fields (``shared_heads``, ``topk``, ``router``, ``compute``).

        >>> import headwise
        >>> mha = headwise.create("mha", dim=64, heads=8)
        >>> moh = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, topk=2)
        >>> moh.config.router, torch.equal(moh.k_proj.weight, mha.k_proj.weight)
        ('norm', True)
        """
        if not isinstance(mha, MultiHeadAttention):
            raise TypeError(f"mha must be a headwise MultiHeadAttention (mha, gqa, mqa), got {type(mha).__name__}")
        c = mha.config
        kept = ("dim", "heads", "kv_heads", "head_dim", "pattern", "causal", "qkv_bias", "out_bias", "dropout", "backend")
        moh = cls(**{name: getattr(c, name) for name in kept}, **{"router": "norm", **config})
        weight = mha.q_proj.weight
        moh.to(device=weight.device, dtype=weight.dtype)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(moh, name).load_state_dict(getattr(mha, name).state_dict())
        return moh

    def route(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        S, K = self.config.shared_heads, self.config.topk
        E = self.heads - S
        shared = x.new_ones(B, N, S)  # (B, N, S)
        aux = x.new_zeros(())
        if not E:
            if self.shared_router is not None:
                shared = torch.softmax(self.shared_router(x), dim=-1) * S
            return shared, torch.ones(B, N, S, dtype=torch.bool, device=x.device), aux
        if self.config.router == "norm":
            norms = q[:, S:].norm(dim=-1).transpose(1, 2)  # (B, N, E) query norm of each routed head
            chosen = _topk_mask(norms, K)  # (B, N, E)
            routed = chosen.to(x.dtype)
            p = torch.softmax(norms / norms.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6), dim=-1)  # (B, N, E)
        else:
            p = torch.softmax(self.router(x), dim=-1)  # (B, N, E)
            chosen = _topk_mask(p, K)  # (B, N, E)
            routed = p * chosen
            routed = routed / routed.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).eps) * K  # (B, N, E)
            if self.shared_router is not None:
                shared = torch.softmax(self.shared_router(x), dim=-1) * S  # (B, N, S)
            if self.mix_router is not None:
                alpha = torch.softmax(self.mix_router(x), dim=-1) * 2  # (B, N, 2)
                shared, routed = shared * alpha[..., :1], routed * alpha[..., 1:]
        f = chosen.to(p.dtype).mean((0, 1))  # (E,) fraction of tokens choosing each routed head
        aux = E * (f * p.mean((0, 1))).sum()
        gates = torch.cat([shared, routed], dim=-1)  # (B, N, H)
        active = torch.cat([torch.ones(B, N, S, dtype=torch.bool, device=x.device), chosen], dim=-1)  # (B, N, H)
        return gates, active, aux


def _topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of ``scores`` along the last axis."""
    top = scores.topk(k, dim=-1).indices  # (..., k)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


@register("relu_moh")
class ReLUMixtureOfHeadsAttention(_RoutedHeads):
    r"""ReLU-routed mixture of heads (ReMoH) of PVChat (Shi et al., 2025, "PVChat: Personalized Video Chat with
    One-Shot Learning").

    MoH (see :class:`MixtureOfHeadsAttention`) with the top-k softmax router replaced by a ReLU, so the routing is
    differentiable and a token uses a variable number of routed heads. With ``h_s`` shared heads first:

    .. math::

        g_{t,i} = \begin{cases} \alpha_1 & i \le h_s \\ \alpha_2\, \mathrm{ReLU}(W_r x_t + b_r)_{i - h_s} & i > h_s
        \end{cases},\qquad [\alpha_1, \alpha_2] = \mathrm{softmax}(W_h x_t)

    A routed head is active where its ReLU output is positive; ``compute="sparse"`` computes it only there.
    Its sparsity is held near ``target_active`` (fraction of routed heads active, ``T``) by the paper's two
    terms, summed on ``aux_loss`` (add it to the training loss as is):

    * Smooth Proximity Regularisation, an adaptive L1 penalty on the routing,
      ``L_SPR = lambda * sum_i f_i * mean_t ReLU(W_r x_t + b_r)_i`` with ``f_i`` the fraction of tokens that
      activate routed head ``i``; after each training forward ``lambda <- lambda * exp(spr_rate * (R - T))``
      (clamped to ``[1e-15, 10]``), ``R`` the fraction of active (token, routed head) pairs: the penalty grows
      while routing is denser than the target and decays while it is sparser.
    * Head Activation Enhancement, ``L_HAE = exp(2 (T - R)) - 1`` when ``R < T`` (too sparse), else 0; ``R``
      counts hard activations forward and takes its gradient from ``mean sigmoid(hae_temperature * logits)``
      (straight-through), so the term can revive heads whose gates collapsed to zero.

    ``aux_loss = L_SPR + hae_weight * L_HAE``; ``spr_weight`` (a buffer) holds ``lambda``. The module reference
    is :func:`naive_relu_moh`.

    Args (beyond those of :class:`~headwise.variants.base.SoftmaxAttention`: dim, heads, kv_heads, head_dim,
    qkv_bias, out_bias, dropout, pattern, causal, backend):
        shared_heads: always-active heads ``h_s``, fewer than ``heads``; default ``heads // 2``.
        target_active: target fraction ``T`` of routed heads active per token, in ``(0, 1]``; default 0.5.
        spr_init: initial SPR weight ``lambda``; default 1e-8 (the authors' setting).
        spr_rate: the ``k`` of ``lambda``'s update; default 0.8 (the authors' setting).
        hae_weight: weight of ``L_HAE``; default 0.5 (the authors' setting).
        hae_temperature: sharpness of the sigmoid surrogate of the activation count; default 10.
        compute: ``"sparse"`` (default) or ``"dense"``, as in :class:`MixtureOfHeadsAttention`.

    Choices made here: the paper writes SPR as a plain L1 norm of the routing; we follow the authors' code
    (DavidYan2001/PVChat), which weights each head's L1 by its activation frequency ``f_i`` (ReMoE's
    load-balanced L1). The paper's gate equation has no scale factors (unlike MoH's code) and we keep it so. The
    authors' code counts activations without gradient, leaving HAE constant; we add the straight-through
    surrogate (as in their later Qwen port). Not reproduced: their clamping of router logits to ``[-1, 10]``,
    their tiny ``N(0, 1e-5)`` router initialisation (we use the :class:`torch.nn.Linear` default, so about half the
    routed heads start active) and their ad-hoc HAE weight increase when no head is active. The router ``W_r``
    has a bias, ``W_h`` none; ``W_h`` exists only with shared heads (without, ``g = ReLU(W_r x + b_r)``).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("relu_moh(shared_heads=2)", dim=64, heads=8).train()
        >>> y = m(torch.randn(2, 100, 64))
        >>> (y.square().mean() + m.aux_loss).backward()
    """

    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "shared_heads": 1}

    @dataclass
    class Config(SoftmaxAttention.Config):
        shared_heads: int | None = None  # always-active heads h_s (the first ones), < heads; None: heads // 2
        target_active: float = 0.5  # target fraction T of routed heads active per token, in (0, 1]
        spr_init: float = 1e-8  # initial weight lambda of the Smooth Proximity Regularisation
        spr_rate: float = 0.8  # k in lambda <- lambda * exp(k (R - T)) after each training forward
        hae_weight: float = 0.5  # weight of the Head Activation Enhancement term
        hae_temperature: float = 10.0  # sharpness of sigmoid(t * logits), the gradient surrogate of the activation rate
        compute: str = "sparse"  # "sparse": compute a routed head only where its gate is positive; "dense": all

        def __post_init__(self):
            super().__post_init__()
            if self.shared_heads is None:
                self.shared_heads = self.heads // 2
            if isinstance(self.shared_heads, bool) or not isinstance(self.shared_heads, int) \
                    or not 0 <= self.shared_heads < self.heads:
                raise ValueError(f"shared_heads must be an int in [0, heads={self.heads}) (relu_moh needs a routed "
                                 f"head), got shared_heads={self.shared_heads!r}")
            if not is_number(self.target_active) or not 0 < self.target_active <= 1:
                raise ValueError(f"target_active must be in (0, 1], got target_active={self.target_active!r}")
            for name in ("spr_init", "hae_temperature"):
                if not is_number(getattr(self, name)) or not getattr(self, name) > 0:
                    raise ValueError(f"{name} must be a positive number, got {name}={getattr(self, name)!r}")
            for name in ("spr_rate", "hae_weight"):
                check_number(name, getattr(self, name), 0)
            check_choice("compute", self.compute, COMPUTE)

    def build(self, cfg) -> None:
        super().build(cfg)
        self.router = nn.Linear(cfg.dim, cfg.heads - cfg.shared_heads, bias=True)  # W_r, b_r
        self.mix_router = nn.Linear(cfg.dim, 2, bias=False) if cfg.shared_heads else None  # W_h
        self.register_buffer("spr_weight", torch.tensor(float(cfg.spr_init)))  # lambda, adapted while training

    def route(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        S = self.config.shared_heads
        logits = self.router(x)  # (B, N, E)
        routed = F.relu(logits)  # (B, N, E)
        chosen = logits > 0  # (B, N, E)
        shared = x.new_ones(B, N, S)  # (B, N, S)
        if self.mix_router is not None:
            alpha = torch.softmax(self.mix_router(x), dim=-1)  # (B, N, 2)
            shared, routed_w = alpha[..., :1].expand(B, N, S), routed * alpha[..., 1:]
        else:
            routed_w = routed
        aux = self._regulariser(logits, routed, chosen)
        gates = torch.cat([shared, routed_w], dim=-1)  # (B, N, H)
        active = torch.cat([torch.ones(B, N, S, dtype=torch.bool, device=x.device), chosen], dim=-1)  # (B, N, H)
        return gates, active, aux

    def _regulariser(self, logits: Tensor, routed: Tensor, chosen: Tensor) -> Tensor:
        """``L_SPR + hae_weight * L_HAE``; in training mode, then adapts ``spr_weight``."""
        cfg = self.config
        hard = chosen.to(logits.dtype)  # (B, N, E)
        rate = hard.mean()  # R, fraction of active (token, routed head) pairs
        soft = torch.sigmoid(cfg.hae_temperature * logits).mean()
        rate_st = rate + soft - soft.detach()  # forward R, gradient of the sigmoid surrogate
        lam = self.spr_weight.detach().clone().to(logits.dtype)  # a copy: the buffer is updated in place below
        spr = lam * (hard.mean((0, 1)) * routed.mean((0, 1))).sum()
        hae = torch.exp(2 * (cfg.target_active - rate_st)) - 1 if rate < cfg.target_active else rate_st * 0
        if self.training:
            with torch.no_grad():
                self.spr_weight.mul_(math.exp(cfg.spr_rate * (float(rate) - cfg.target_active))).clamp_(1e-15, 10.0)
        return spr + cfg.hae_weight * hae


# ---- references: the papers' equations written out with the modules' weights -----------------------------------


def naive_topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask ``[..., E]`` of the ``k`` largest entries of ``scores`` ``[..., E]``: the sum of their one-hot
    rows (the reference of the modules' scatter)."""
    return F.one_hot(scores.topk(k, dim=-1).indices, scores.shape[-1]).sum(-2).bool()  # (..., E)


def _naive_heads(m: _RoutedHeads, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """``F.linear`` projections of ``x`` and ``context`` with ``m``'s weights and every head's materialized
    attention (:func:`headwise.core.reference.naive_attention`): ``(q [B, H, N, D], heads [B, H, N, D])``."""
    q, k, v = naive_projections(m, x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
    return q, naive_attention(q, k, v, m.pattern)[0]  # (B, H, N, D) each


def _naive_head_sum(m: _RoutedHeads, heads: Tensor, g: Tensor) -> Tensor:
    """``sum_h g[..., h] head_h W^O_h``: heads ``[B, H, N, D]`` weighted by ``g`` ``[B, N, H]``, output projection."""
    B, H, N, D = heads.shape
    out = (heads.transpose(1, 2) * g[..., None]).reshape(B, N, H * D)  # (B, N, H*D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)  # (B, N, C)


def naive_moh(m: MixtureOfHeadsAttention, x: Tensor, context: Tensor | None = None) -> Tensor:
    """The reference of :class:`MixtureOfHeadsAttention`: MoH from the paper's equations (with the authors'
    scalings) and the module's weights: projections, materialized per-head attention, the router, the weighted
    head sum, the output projection. Shapes as the module's forward; no dropout (compare in ``eval()`` mode)."""
    B, N, _ = x.shape
    S, K = m.config.shared_heads, m.config.topk
    E = m.heads - S
    q, heads = _naive_heads(m, x, context)  # (B, H, N, D) each
    g_shared = torch.ones(B, N, S, dtype=x.dtype)
    if m.config.router == "norm":
        chosen = naive_topk_mask(q[:, S:].norm(dim=-1).transpose(1, 2), K)  # (B, N, E) by query norm
        g_routed = chosen.to(x.dtype)
    else:
        p = torch.softmax(x @ m.router.weight.T, dim=-1)  # (B, N, E)
        chosen = naive_topk_mask(p, K)
        g_routed = K * p * chosen / (p * chosen).sum(-1, keepdim=True)
        if S > 1:
            g_shared = S * torch.softmax(x @ m.shared_router.weight.T, dim=-1)
        if S and E:
            alpha = 2 * torch.softmax(x @ m.mix_router.weight.T, dim=-1)  # (B, N, 2)
            g_shared, g_routed = g_shared * alpha[..., :1], g_routed * alpha[..., 1:]
    return _naive_head_sum(m, heads, torch.cat([g_shared, g_routed], dim=-1))  # (B, N, C)


def naive_relu_moh(m: ReLUMixtureOfHeadsAttention, x: Tensor, context: Tensor | None = None) -> Tensor:
    """The reference of :class:`ReLUMixtureOfHeadsAttention`'s output (the gate equation of PVChat with the
    module's weights): projections, materialized per-head attention, ``ReLU`` routing mixed by ``softmax(W_h x)``,
    the weighted head sum, the output projection. Shapes as the module's forward; no dropout."""
    B, N, _ = x.shape
    S = m.config.shared_heads
    _, heads = _naive_heads(m, x, context)  # (B, H, N, D)
    g_routed = torch.relu(x @ m.router.weight.T + m.router.bias)  # (B, N, E)
    g_shared = torch.ones(B, N, S, dtype=x.dtype)
    if S:
        alpha = torch.softmax(x @ m.mix_router.weight.T, dim=-1)  # (B, N, 2)
        g_shared, g_routed = g_shared * alpha[..., :1], g_routed * alpha[..., 1:]
    return _naive_head_sum(m, heads, torch.cat([g_shared, g_routed], dim=-1))  # (B, N, C)
