"""Head-level variants: mixture-of-heads routing, single-head attention, cascaded group attention.

Registered here:

* ``"moh"`` -- :class:`MixtureOfHeadsAttention`, MoH (Jin et al., 2024): shared heads plus top-k routed heads,
  the heads summed with per-token weights; with the parameter-free router used to convert a trained MHA.
* ``"relu_moh"`` -- :class:`ReLUMixtureOfHeadsAttention`, the ReLU-routed MoH of PVChat (Shi et al., 2025).
* ``"single_head"`` -- :class:`SingleHeadAttention`, SHViT's single-head attention on a channel fraction.
* ``"cascaded_group"`` -- :class:`CascadedGroupAttention`, EfficientViT's cascaded group attention.

The routed modules share one functional core: :func:`gather_head_mixture` computes, for every head, attention
only for the tokens that selected the head (the queries are gathered, every key of the head is kept), and
:func:`dense_head_mixture` computes every head for every token and masks; the second is the reference of the
first. Both call :func:`headwise.attention`, so every pattern and backend applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise import patterns
from headwise.core.attention import BACKENDS, attention
from headwise.patterns import Causal, Full, Pattern
from headwise.checks import check_positive_int
from headwise.variants.registry import register
from headwise.variants.mha import MultiHeadAttention

__all__ = [
    "MixtureOfHeadsAttention",
    "ReLUMixtureOfHeadsAttention",
    "SingleHeadAttention",
    "CascadedGroupAttention",
    "dense_head_mixture",
    "gather_head_mixture",
]


# ---- the functional core: a per-token weighted sum of heads ----------------------------------------------------


class _Restricted(Pattern):
    """``base`` as seen by a call that holds only some of its query rows and/or heads.

    ``rows``: the original query positions of the call's queries (``None``: all, in order). ``heads``: the
    original head ids of the call's heads (``None``: all). Used by :func:`gather_head_mixture` to keep a pattern
    exact after the queries of one head were gathered.
    """

    def __init__(self, base: Pattern, n_q: int, rows: Tensor | None = None, heads: Tensor | None = None):
        self.base, self.n_q, self.rows = base, n_q, rows
        self.head_ids = heads if base.heads is not None else None
        # one fixed head: the call is head-independent; several: the call's head j is the base's head_ids[j]
        self.heads = None if self.head_ids is None or self.head_ids.numel() == 1 else self.head_ids.numel()

    def check(self, n_q, n_kv):
        expected = self.n_q if self.rows is None else self.rows.numel()
        if n_q != expected:
            raise ValueError(f"restricted pattern holds {expected} query rows, got {n_q=}")
        self.base.check(self.n_q, n_kv)

    def mask(self, q_idx, kv_idx, head=None):
        q = q_idx if self.rows is None else self.rows.to(q_idx.device)[q_idx]
        if self.head_ids is None:
            return self.base.mask(q, kv_idx)
        if self.head_ids.numel() == 1:
            return self.base.mask(q, kv_idx, int(self.head_ids[0]))
        ids = self.head_ids.to(q.device)
        return self.base.mask(q, kv_idx, int(ids[head]) if isinstance(head, int) else ids[head])

    def __repr__(self):
        return f"_Restricted({self.base!r}, rows={None if self.rows is None else self.rows.numel()}, heads={self.head_ids})"


def _restrict(pattern: Pattern | None, n_q: int, rows: Tensor | None, heads: Tensor, n_heads: int) -> Pattern | None:
    """The pattern for a call on query ``rows`` of ``heads``; the pattern itself where nothing changes (so a
    plain ``Causal`` keeps the fused causal kernels)."""
    if pattern is None or isinstance(pattern, Full):
        return None
    all_heads = pattern.heads is None or (heads.numel() == n_heads and bool((heads == torch.arange(n_heads)).all()))
    if rows is None and all_heads:
        return pattern
    return _Restricted(pattern, n_q, rows, heads)


def _qkv_of_heads(q: Tensor, k: Tensor, v: Tensor, heads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries of ``heads`` (ascending ids) and the keys and values they read: slices when the heads are
    consecutive (and, for keys and values, whole GQA groups, keeping the broadcast), else copies with one
    key/value head per query head."""
    group = q.shape[1] // k.shape[1]
    first, n = int(heads[0]), heads.numel()
    if not bool((heads == torch.arange(first, first + n)).all()):
        kv = heads // group
        return q[:, heads], k[:, kv], v[:, kv]  # (B, n, N, D), (B, n, M, D), (B, n, M, Dv)
    q = q[:, first : first + n]  # (B, n, N, D)
    if first % group == 0 and n % group == 0:
        return q, k[:, first // group : (first + n) // group], v[:, first // group : (first + n) // group]
    kv = heads // group
    return q, k[:, kv], v[:, kv]


def _check_mixture(q: Tensor, gates: Tensor, active: Tensor) -> None:
    B, H, N, _ = q.shape
    if not isinstance(gates, Tensor) or tuple(gates.shape) != (B, N, H):
        raise ValueError(f"gates must be [B, N, H] = {[B, N, H]}, got "
                         f"{tuple(gates.shape) if isinstance(gates, Tensor) else type(gates).__name__}")
    if not isinstance(active, Tensor) or active.dtype != torch.bool or tuple(active.shape) != (B, N, H):
        raise ValueError(f"active must be a bool tensor [B, N, H] = {[B, N, H]}, got "
                         f"{(active.dtype, tuple(active.shape)) if isinstance(active, Tensor) else type(active).__name__}")


def dense_head_mixture(
    q: Tensor, k: Tensor, v: Tensor, gates: Tensor, active: Tensor, pattern: Pattern | None = None,
    *, scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Per-token weighted sum of heads, every head computed for every token (the reference of the gather path).

    ``out[b, n, h] = [active[b, n, h]] * gates[b, n, h] * attention(q, k, v, pattern)[b, h, n]``

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, M, D]`` and ``[B, H_kv, M, Dv]`` (GQA when ``H_kv < H``).
        gates: ``[B, N, H]`` weight of each head for each token.
        active: ``[B, N, H]`` bool, the heads each token uses; inactive pairs get weight 0 (and no gradient
            reaches their gate).
        pattern, scale, backend: as in :func:`headwise.attention`.

    Returns:
        ``[B, N, H, Dv]`` (token-major: ``.reshape(B, N, H * Dv)`` feeds the output projection).
    """
    _check_mixture(q, gates, active)
    o = attention(q, k, v, pattern, scale=scale, backend=backend)  # (B, H, N, Dv)
    w = torch.where(active, gates, torch.zeros((), dtype=gates.dtype, device=gates.device))  # (B, N, H)
    return o.transpose(1, 2) * w[..., None].to(o.dtype)  # (B, N, H, Dv)


def gather_head_mixture(
    q: Tensor, k: Tensor, v: Tensor, gates: Tensor, active: Tensor, pattern: Pattern | None = None,
    *, scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Per-token weighted sum of heads computing each head only for the tokens that use it.

    Same result as :func:`dense_head_mixture` (forward and gradients). Heads every token uses (MoH's shared
    heads) run in one :func:`headwise.attention` call; for each other head the queries of the tokens that
    selected it are gathered and attend to all keys of the head (a pattern is kept exact by evaluating it at the
    gathered positions), and the weighted outputs are scattered back. A token's unselected heads cost nothing,
    so the work is ``sum_h (tokens using h) x M`` instead of ``H x N x M``.

    Shapes as in :func:`dense_head_mixture`: returns ``[B, N, H, Dv]``. With ``B > 1`` the gathered queries of
    a head are padded to the largest count in the batch (the padding rows get weight 0); with ``B > 1`` and a
    pattern, one call per batch element.

    Speed: one attention call per routed head (and one host synchronisation to size it). On CPUs, where the
    attention itself dominates, the skipped work turns into time; on a GPU at moderate sizes the many small
    launches cost more than they save, and :func:`dense_head_mixture` is the faster choice.
    """
    _check_mixture(q, gates, active)
    B, H, N, D = q.shape
    H_kv, Dv = k.shape[1], v.shape[-1]
    group = H // H_kv
    w = torch.where(active, gates, torch.zeros((), dtype=gates.dtype, device=gates.device)).to(q.dtype)  # (B, N, H)
    out = q.new_zeros(B, N, H, Dv)  # every head writes its slice; unselected (token, head) pairs stay zero
    everywhere = active.all(dim=1).all(dim=0).cpu()  # (H,) heads every token uses
    dense = everywhere.nonzero().flatten()
    if dense.numel():
        qd, kd, vd = _qkv_of_heads(q, k, v, dense)
        o = attention(qd, kd, vd, _restrict(pattern, N, None, dense, H), scale=scale, backend=backend)  # (B, L, N, Dv)
        out[:, :, dense] = o.transpose(1, 2) * w[:, :, dense, None]
    for h in (~everywhere).nonzero().flatten().tolist():
        _gather_one_head(out[:, :, h], q, k[:, h // group : h // group + 1], v[:, h // group : h // group + 1],
                         w[:, :, h], active[:, :, h], h, pattern, scale, backend)
    return out  # (B, N, H, Dv)


def _gather_one_head(out_h, q, k_h, v_h, w_h, sel, h, pattern, scale, backend) -> None:
    """Write head ``h``, computed for its selected tokens only, into ``out_h`` ``[B, N, Dv]`` (zeros), where
    ``sel`` ``[B, N]`` is True."""
    B, H, N, D = q.shape
    Dv = v_h.shape[-1]
    counts = sel.sum(1)  # (B,)
    c = int(counts.max())
    if c == 0:
        return
    # selected positions first, in ascending order (a stable sort of the "not selected" flags)
    order = torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices[:, :c]  # (B, c)
    q_sel = q[:, h].gather(1, order[..., None].expand(B, c, D))[:, None]  # (B, 1, c, D)
    head = torch.tensor([h])
    if pattern is None or isinstance(pattern, Full):
        o = attention(q_sel, k_h, v_h, None, scale=scale, backend=backend)[:, 0]  # (B, c, Dv)
    else:  # the pattern is evaluated at the gathered positions, which differ per batch element
        parts = []
        for b in range(B):
            n_b = int(counts[b])
            if n_b == 0:
                parts.append(q.new_zeros(c, Dv))
                continue
            rows = order[b, :n_b]
            o_b = attention(q_sel[b : b + 1, :, :n_b], k_h[b : b + 1], v_h[b : b + 1],
                            _restrict(pattern, N, rows, head, H), scale=scale, backend=backend)[0, 0]  # (n_b, Dv)
            parts.append(F.pad(o_b, (0, 0, 0, c - n_b)))
        o = torch.stack(parts)  # (B, c, Dv)
    contrib = o * w_h.gather(1, order)[..., None]  # (B, c, Dv); padding rows are unselected tokens: weight 0
    out_h.scatter_(1, order[..., None].expand(B, c, Dv), contrib)  # (B, N, Dv)


# ---- mixture-of-heads modules ------------------------------------------------------------------------------------


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {name}={value!r}")


class _RoutedHeads(MultiHeadAttention):
    """Multi-head attention whose heads are summed with per-token weights from a router.

    Owns the projections of :class:`MultiHeadAttention`; subclasses implement :meth:`route`. After each forward,
    ``aux_loss`` (a scalar tensor: the router's regulariser), ``head_gates`` ``[B, N, H]`` (detached weights)
    and ``head_active`` ``[B, N, H]`` (bool, the heads each token computed) hold the routing of that call.
    """

    def route(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(gates [B, N, H], active [B, N, H] bool, aux_loss [])`` for tokens ``x`` ``[B, N, C]`` and their
        queries ``q`` ``[B, H, N, D]``."""
        raise NotImplementedError

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Route each token of ``x`` ``[B, N, C]`` to its heads and attend to ``context`` ``[B, M, C]`` (``x``
        itself when None); returns ``[B, N, C]``."""
        q, k, v = self.project(x, context)  # (B, H, N, D), 2 x (B, H_kv, M, D)
        B, N, _ = x.shape
        gates, active, self.aux_loss = self.route(x, q)  # (B, N, H), (B, N, H), ()
        self.head_gates, self.head_active = gates.detach(), active
        mixture = gather_head_mixture if self.config.compute == "sparse" else dense_head_mixture
        out = mixture(q, k, v, gates, active, self.pattern, backend=self.backend)  # (B, N, H, D)
        return self.dropout(self.out_proj(out.reshape(B, N, -1)))  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"{super().extra_repr()}, shared_heads={c.shared_heads}, compute={c.compute!r}"


@register("moh")
class MixtureOfHeadsAttention(_RoutedHeads):
    r"""Mixture-of-Head attention (MoH; Jin, Zhu, Yuan, Yan, 2024, "MoH: Multi-Head Attention as Mixture-of-Head
    Attention").

    Multi-head attention written as a sum over heads, ``MHA(x) = sum_h head_h(x) W^O_h``, becomes a per-token
    weighted sum over a subset of heads, ``MoH(x_t) = sum_h g_{t,h} head_h(x_t) W^O_h``. The first ``h_s =
    shared_heads`` heads are always active; each token picks ``k = top_k`` of the ``E = H - h_s`` routed heads:

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
    a :class:`MultiHeadAttention`; with ``top_k`` equal to the routed heads it computes exactly that MHA.

    ``compute="sparse"`` (default) runs :func:`gather_head_mixture`: a routed head is computed only for the
    tokens that selected it. ``compute="dense"`` runs :func:`dense_head_mixture` (every head, then masked); the
    two agree.

    Shapes: ``x`` ``[B, N, C]`` (and ``context`` ``[B, M, C]``) -> ``[B, N, C]``; inside, q ``[B, H, N, D]``,
    k, v ``[B, H_kv, M, D]``, gates ``[B, N, H]``.

    Args (beyond those of :class:`MultiHeadAttention`):
        shared_heads: always-active heads ``h_s`` (the first ones); default ``heads // 2``.
        top_k: routed heads each token activates, ``1 <= k <= heads - shared_heads`` (0 when every head is
            shared); default half the routed heads, rounded up.
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
        >>> m = headwise.create("moh(shared_heads=2, top_k=3)", dim=512, heads=8)
        >>> y = m(torch.randn(2, 1024, 512))                    # [B, N, C]
        >>> loss = y.square().mean() + 0.01 * m.aux_loss
        >>> int(m.head_active.sum(-1).unique())                 # 2 shared + 3 routed heads per token
        5
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
        shared_heads: int | None = None  # always-active heads h_s (the first ones); None: heads // 2
        top_k: int | None = None  # routed heads per token, 1..heads-shared_heads (0 if none); None: half, rounded up
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
            if self.top_k is None:
                self.top_k = (routed + 1) // 2
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                raise TypeError(f"top_k must be an int, got top_k={self.top_k!r}")
            if self.top_k > routed:
                raise ValueError(f"top_k={self.top_k} exceeds the {routed} routed heads "
                                 f"(heads={self.heads} - shared_heads={self.shared_heads})")
            if routed and self.top_k < 1:
                raise ValueError(f"top_k must be at least 1 with {routed} routed heads, got top_k={self.top_k}")
            if not routed and self.top_k != 0:
                raise ValueError(f"every head is shared (shared_heads={self.shared_heads}), so top_k must be 0, got {self.top_k}")
            _check_choice("router", self.router, ("learned", "norm"))
            _check_choice("compute", self.compute, ("sparse", "dense"))

    def __init__(
        self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
        pattern: Pattern | str | None = None, qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", shared_heads: int | None = None, top_k: int | None = None, router: str = "learned",
        compute: str = "sparse",
    ):
        super().__init__(dim, heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias,
                         out_bias=out_bias, dropout=dropout, backend=backend)
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias,
            out_bias=out_bias, dropout=dropout, backend=backend, shared_heads=shared_heads, top_k=top_k,
            router=router, compute=compute,
        )
        self.shared_heads, self.top_k = cfg.shared_heads, cfg.top_k
        routed = cfg.heads - cfg.shared_heads
        learned = cfg.router == "learned"
        self.router = nn.Linear(dim, routed, bias=False) if learned and routed else None  # W_r
        self.shared_router = nn.Linear(dim, cfg.shared_heads, bias=False) if learned and cfg.shared_heads > 1 else None  # W_s
        self.mix_router = nn.Linear(dim, 2, bias=False) if learned and routed and cfg.shared_heads else None  # W_h
        self.aux_loss, self.head_gates, self.head_active = torch.zeros(()), None, None

    @classmethod
    def from_mha(
        cls, mha: MultiHeadAttention, *, shared_heads: int | None = None, top_k: int | None = None,
        router: str = "norm", compute: str = "sparse",
    ) -> MixtureOfHeadsAttention:
        """MoH with the projections of a trained :class:`MultiHeadAttention` (also GQA/MQA) copied in.

        The paper's conversion (MoH-LLaMA3) keeps the weights and routes by query norm (``router="norm"``,
        default) before continue-tuning; ``router="learned"`` adds freshly initialised routers instead. The
        result has ``mha``'s dim, heads, kv_heads, head_dim, pattern, biases, dropout, backend, dtype and device.

        >>> mha = headwise.create("mha", dim=256, heads=8)
        >>> moh = MixtureOfHeadsAttention.from_mha(mha, shared_heads=4, top_k=2)
        """
        if not isinstance(mha, MultiHeadAttention):
            raise TypeError(f"mha must be a headwise MultiHeadAttention (mha, gqa, mqa), got {type(mha).__name__}")
        c = mha.config
        moh = cls(c.dim, c.heads, kv_heads=c.kv_heads, head_dim=c.head_dim, pattern=c.pattern, qkv_bias=c.qkv_bias,
                  out_bias=c.out_bias, dropout=c.dropout, backend=c.backend, shared_heads=shared_heads, top_k=top_k,
                  router=router, compute=compute)
        weight = mha.q_proj.weight
        moh.to(device=weight.device, dtype=weight.dtype)
        for name in ("q_proj", "kv_proj", "out_proj"):
            getattr(moh, name).load_state_dict(getattr(mha, name).state_dict())
        return moh

    def route(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        S, K = self.shared_heads, self.top_k
        E = self.heads - S
        shared = x.new_ones(B, N, S)  # (B, N, S)
        aux = x.new_zeros(())
        if not E:
            if self.shared_router is not None:
                shared = torch.softmax(self.shared_router(x), dim=-1) * S
            return shared, torch.ones(B, N, S, dtype=torch.bool, device=x.device), aux
        if self.config.router == "norm":
            norms = q[:, S:].norm(dim=-1).transpose(1, 2)  # (B, N, E) query norm of each routed head
            chosen = _top_k_mask(norms, K)  # (B, N, E)
            routed = chosen.to(x.dtype)
            p = torch.softmax(norms / norms.std(-1, unbiased=False, keepdim=True).clamp_min(1e-6), dim=-1)  # (B, N, E)
        else:
            p = torch.softmax(self.router(x), dim=-1)  # (B, N, E)
            chosen = _top_k_mask(p, K)  # (B, N, E)
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


def _top_k_mask(scores: Tensor, k: int) -> Tensor:
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

    ``aux_loss = L_SPR + hae_weight * L_HAE``; ``spr_weight`` (a buffer) holds ``lambda``.

    Args (beyond those of :class:`MultiHeadAttention`):
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
        >>> m = headwise.create("relu_moh(shared_heads=2)", dim=256, heads=8).train()
        >>> y = m(torch.randn(2, 300, 256))
        >>> (y.square().mean() + m.aux_loss).backward()
    """

    @dataclass
    class Config(MultiHeadAttention.Config):
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
            if not _is_number(self.target_active) or not 0 < self.target_active <= 1:
                raise ValueError(f"target_active must be in (0, 1], got target_active={self.target_active!r}")
            for name, low in (("spr_init", 0.0), ("hae_temperature", 0.0)):
                if not _is_number(getattr(self, name)) or not getattr(self, name) > low:
                    raise ValueError(f"{name} must be a positive number, got {name}={getattr(self, name)!r}")
            for name in ("spr_rate", "hae_weight"):
                if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                    raise ValueError(f"{name} must be a number >= 0, got {name}={getattr(self, name)!r}")
            _check_choice("compute", self.compute, ("sparse", "dense"))

    def __init__(
        self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
        pattern: Pattern | str | None = None, qkv_bias: bool = True, out_bias: bool = True, dropout: float = 0.0,
        backend: str = "auto", shared_heads: int | None = None, target_active: float = 0.5, spr_init: float = 1e-8,
        spr_rate: float = 0.8, hae_weight: float = 0.5, hae_temperature: float = 10.0, compute: str = "sparse",
    ):
        super().__init__(dim, heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias,
                         out_bias=out_bias, dropout=dropout, backend=backend)
        self.config = cfg = self.Config(
            dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, pattern=pattern, qkv_bias=qkv_bias,
            out_bias=out_bias, dropout=dropout, backend=backend, shared_heads=shared_heads,
            target_active=target_active, spr_init=spr_init, spr_rate=spr_rate, hae_weight=hae_weight,
            hae_temperature=hae_temperature, compute=compute,
        )
        self.shared_heads = cfg.shared_heads
        self.router = nn.Linear(dim, cfg.heads - cfg.shared_heads, bias=True)  # W_r, b_r
        self.mix_router = nn.Linear(dim, 2, bias=False) if cfg.shared_heads else None  # W_h
        self.register_buffer("spr_weight", torch.tensor(float(cfg.spr_init)))  # lambda, adapted while training
        self.aux_loss, self.head_gates, self.head_active = torch.zeros(()), None, None

    def route(self, x: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        S, cfg = self.shared_heads, self.config
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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ---- single-head and cascaded group attention ---------------------------------------------------------------------


def _resolve_pattern(pattern, heads: int | None) -> Pattern | None:
    """A :class:`Pattern`, a pattern spec string or None, validated (the rules of :class:`MultiHeadAttention`)."""
    if isinstance(pattern, str):
        pattern = patterns.from_spec(pattern)
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a headwise Pattern, a pattern spec string or None, "
                        f"got pattern={pattern!r} ({type(pattern).__name__})")
    if pattern is not None and pattern.heads not in (None, heads):
        raise ValueError(f"head-specific pattern has {pattern.heads} heads but the module has {heads} head(s)")
    return pattern


def _check_backend(backend) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))


def _check_tokens(x, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, N, C], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must be [B, N, C] with C = dim = {dim} and B, N >= 1, got x.shape={tuple(x.shape)}")


@register("single_head")
class SingleHeadAttention(nn.Module):
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
    future through them: causal patterns need ``norm="layer"`` (a per-token LayerNorm, our departure for
    autoregressive use), and ``norm="group"`` with a causal pattern raises. Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; the head is q, k ``[B, 1, N, d_qk]``, v ``[B, 1, N, C_p]``.
    There is no ``heads`` argument: the module has one head by design.

    Args:
        dim: model width ``C``.
        partial: fraction of channels given to the head, in ``(0, 1]``; default 0.25 (SHViT's
            ``partial_dim / embed_dim`` = 32/128, 64/256, 96/384).
        qk_dim: query/key width ``d_qk``; default 16 (SHViT).
        pattern: a pattern or spec string for the head (default None: full attention).
        bias: bias in the qkv and output projections; default True.
        backend: :func:`headwise.attention` backend; default ``"auto"``.
        norm: ``"group"`` (SHViT's GroupNorm over the sequence), ``"layer"`` (per token; causal-safe) or ``"auto"``
            (default): ``"layer"`` with a :class:`~headwise.patterns.Causal` pattern, else ``"group"``.

    Choices made here: SHViT works on ``[B, C, H, W]`` maps with 1x1 convolutions followed by BatchNorm (the
    output one initialised to zero); we use tokens ``[B, N, C]`` and linear layers with bias (what the BatchNorms
    fold into at inference) with the default initialisation, so the module is not the identity at start.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("single_head(partial=0.25)", dim=384)
        >>> m(torch.randn(2, 196, 384)).shape
        torch.Size([2, 196, 384])
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        partial: float = 0.25  # fraction of channels given to the single head, in (0, 1]
        qk_dim: int = 16  # width of the query and the key
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        bias: bool = True  # bias in the qkv and output projections
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"
        norm: str = "auto"  # head pre-norm: "group" (over the sequence, SHViT), "layer" (per token), "auto" (below)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            if not _is_number(self.partial) or not 0 < self.partial <= 1:
                raise ValueError(f"partial must be a fraction in (0, 1], got partial={self.partial!r}")
            if round(self.partial * self.dim) < 1:
                raise ValueError(f"partial={self.partial} leaves no channel for the head with dim={self.dim}")
            check_positive_int("qk_dim", self.qk_dim)
            self.pattern = _resolve_pattern(self.pattern, 1)
            if not isinstance(self.bias, bool):
                raise TypeError(f"bias must be a bool, got bias={self.bias!r}")
            _check_backend(self.backend)
            if self.norm not in ("auto", "group", "layer"):
                raise ValueError(f"norm must be 'auto', 'group' or 'layer', got norm={self.norm!r}")
            if self.norm == "auto":  # the paper's GroupNorm, unless that would leak the future
                self.norm = "layer" if isinstance(self.pattern, Causal) else "group"
            if self.norm == "group" and isinstance(self.pattern, Causal):
                raise ValueError(f"norm='group' normalizes over the whole sequence, so pattern={self.pattern!r} "
                                 "would still see future tokens; use norm='layer' for causal attention")

    def __init__(self, dim: int, *, partial: float = 0.25, qk_dim: int = 16, pattern: Pattern | str | None = None,
                 bias: bool = True, backend: str = "auto", norm: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, partial=partial, qk_dim=qk_dim, pattern=pattern, bias=bias,
                                        backend=backend, norm=norm)
        self.dim, self.qk_dim, self.pattern, self.backend = cfg.dim, cfg.qk_dim, cfg.pattern, cfg.backend
        self.pdim = round(cfg.partial * cfg.dim)  # C_p
        self.pre_norm = nn.GroupNorm(1, self.pdim) if cfg.norm == "group" else nn.LayerNorm(self.pdim)
        self.qkv = nn.Linear(self.pdim, 2 * cfg.qk_dim + self.pdim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
        _check_tokens(x, self.dim)
        x1, x2 = x.split([self.pdim, self.dim - self.pdim], dim=-1)  # (B, N, C_p), (B, N, C - C_p)
        if isinstance(self.pre_norm, nn.GroupNorm):  # statistics over (tokens, channels) of each sample
            x1 = self.pre_norm(x1.transpose(1, 2)).transpose(1, 2)  # (B, N, C_p)
        else:
            x1 = self.pre_norm(x1)  # (B, N, C_p), per token
        q, k, v = self.qkv(x1)[:, None].split([self.qk_dim, self.qk_dim, self.pdim], dim=-1)  # (B, 1, N, d_qk|C_p)
        o = attention(q, k, v, self.pattern, backend=self.backend)[:, 0]  # (B, N, C_p)
        return self.proj(F.relu(torch.cat([o, x2], dim=-1)))  # (B, N, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, pdim={self.pdim}, qk_dim={self.qk_dim}, pattern={self.pattern!r}, backend={self.backend!r}"


@register("cascaded_group")
class CascadedGroupAttention(nn.Module):
    r"""Cascaded group attention (CGA; Liu et al., 2023, "EfficientViT: Memory Efficient Vision Transformer with
    Cascaded Group Attention").

    Each head sees its own split of the channels, ``x = [x_1, ..., x_H]`` (``C / H`` channels each), and the
    heads run in sequence, each adding the previous head's output to its input:

    .. math::

        \tilde x_1 = x_1,\quad \tilde x_i = x_i + \tilde y_{i-1}\ (i > 1),\qquad
        q_i, k_i, v_i = \tilde x_i [W^Q_i, W^K_i, W^V_i],\quad q_i \leftarrow \mathrm{DWConv}_i(q_i)

        \tilde y_i = \mathrm{softmax}(q_i k_i^\top / \sqrt{d_{qk}})\, v_i,\qquad
        y = \mathrm{ReLU}([\tilde y_1, \dots, \tilde y_H])\, W^P

    ``DWConv_i`` is a depthwise convolution (``kernel_size``, zero padding) over the token sequence, or over a
    2-D grid of ``grid = (rows, cols)`` tokens in row-major order when ``grid`` is given. Values have ``C / H``
    channels so the cascade adds up.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; head ``i`` is q, k ``[B, 1, N, d_qk]``, v ``[B, 1, N, C/H]``.

    Args:
        dim: model width ``C``, a multiple of ``heads``.
        heads: number of heads ``H`` (channel splits).
        key_dim: query/key width ``d_qk``; default 16 (EfficientViT).
        kernel_size: odd depthwise kernel size on the queries; default 5 (EfficientViT).
        grid: ``(rows, cols)`` token grid for a 2-D convolution, ``rows * cols`` must equal ``N``; default None (1-D).
        proj_relu: ReLU before the output projection (EfficientViT); default True.
        pattern: a pattern or spec string (head-specific patterns need ``heads`` heads); default None.
        bias: bias in the projections and convolutions; default True.
        backend: :func:`headwise.attention` backend; default ``"auto"``.

    Choices made here: EfficientViT works on ``[B, C, H, W]`` windows with BatchNorm after every 1x1 and depthwise
    convolution and adds a learned relative-position bias to the scores; we use linear layers and convolutions
    with bias (what the BatchNorms fold into at inference) and no score bias (:func:`headwise.attention` takes
    patterns, not biases; the windowing of EfficientViT can be expressed as a pattern). With ``heads=1``,
    ``kernel_size=1`` (an identity convolution) and ``proj_relu=False`` it is single-head attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("cascaded_group(grid=(14, 14))", dim=128, heads=4)
        >>> m(torch.randn(2, 196, 128)).shape
        torch.Size([2, 196, 128])
    """

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output; a multiple of heads
        heads: int  # number of heads H, each on its own C/H channels
        key_dim: int = 16  # width of the queries and keys of every head
        kernel_size: int = 5  # odd size of the depthwise convolution on the queries
        grid: tuple[int, int] | None = None  # (rows, cols) token grid for a 2-D convolution; None: 1-D over tokens
        proj_relu: bool = True  # ReLU before the output projection (EfficientViT)
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        bias: bool = True  # bias in the projections and the convolutions
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.dim % self.heads:
                raise ValueError(f"dim must be divisible by heads, got dim={self.dim} heads={self.heads}")
            check_positive_int("key_dim", self.key_dim)
            check_positive_int("kernel_size", self.kernel_size)
            if self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd (same-size convolution), got kernel_size={self.kernel_size}")
            if self.grid is not None:
                if not (isinstance(self.grid, (tuple, list)) and len(self.grid) == 2
                        and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in self.grid)):
                    raise ValueError(f"grid must be None or (rows, cols) of positive ints, got grid={self.grid!r}")
                self.grid = tuple(self.grid)
                if self.kernel_size > min(self.grid):
                    raise ValueError(f"kernel_size={self.kernel_size} exceeds grid={self.grid}")
            for name in ("proj_relu", "bias"):
                if not isinstance(getattr(self, name), bool):
                    raise TypeError(f"{name} must be a bool, got {name}={getattr(self, name)!r}")
            self.pattern = _resolve_pattern(self.pattern, self.heads)
            _check_backend(self.backend)

    def __init__(self, dim: int, heads: int, *, key_dim: int = 16, kernel_size: int = 5,
                 grid: tuple[int, int] | None = None, proj_relu: bool = True, pattern: Pattern | str | None = None,
                 bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, key_dim=key_dim, kernel_size=kernel_size, grid=grid,
                                        proj_relu=proj_relu, pattern=pattern, bias=bias, backend=backend)
        self.dim, self.heads, self.key_dim, self.grid = cfg.dim, cfg.heads, cfg.key_dim, cfg.grid
        self.pattern, self.backend = cfg.pattern, cfg.backend
        self.split = cfg.dim // cfg.heads  # C/H: input split and value width of each head
        conv = nn.Conv1d if cfg.grid is None else nn.Conv2d
        self.qkvs = nn.ModuleList(nn.Linear(self.split, 2 * cfg.key_dim + self.split, bias=cfg.bias)
                                  for _ in range(cfg.heads))
        self.dws = nn.ModuleList(conv(cfg.key_dim, cfg.key_dim, cfg.kernel_size, padding=cfg.kernel_size // 2,
                                      groups=cfg.key_dim, bias=cfg.bias) for _ in range(cfg.heads))
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (``N = rows * cols`` when ``grid`` is set)."""
        _check_tokens(x, self.dim)
        B, N, _ = x.shape
        if self.grid is not None and self.grid[0] * self.grid[1] != N:
            raise ValueError(f"grid={self.grid} does not multiply to N={N} tokens")
        splits = x.split(self.split, dim=-1)  # H x (B, N, C/H)
        outs: list[Tensor] = []
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            feat = splits[i] if i == 0 else splits[i] + outs[-1]  # (B, N, C/H): the cascade
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.split], dim=-1)  # (B, N, d_qk|C/H)
            q = self._conv_tokens(dw, q)  # (B, N, d_qk)
            pattern = _restrict(self.pattern, N, None, torch.tensor([i]), self.heads)
            o = attention(q[:, None], k[:, None], v[:, None], pattern, backend=self.backend)  # (B, 1, N, C/H)
            outs.append(o[:, 0])
        y = torch.cat(outs, dim=-1)  # (B, N, C)
        return self.proj(F.relu(y) if self.config.proj_relu else y)  # (B, N, C)

    def _conv_tokens(self, dw: nn.Module, t: Tensor) -> Tensor:
        """Depthwise convolution of token features ``[B, N, d]`` along the sequence or the grid."""
        B, N, d = t.shape
        if self.grid is None:
            return dw(t.transpose(1, 2)).transpose(1, 2)  # (B, N, d)
        img = t.transpose(1, 2).reshape(B, d, *self.grid)  # (B, d, rows, cols), tokens row-major
        return dw(img).reshape(B, d, N).transpose(1, 2)  # (B, N, d)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, heads={c.heads}, key_dim={c.key_dim}, kernel_size={c.kernel_size}, grid={c.grid}, "
                f"pattern={c.pattern!r}, backend={c.backend!r}")
