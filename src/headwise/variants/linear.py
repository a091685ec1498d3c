"""Kernelized linear attention, "Transformers are RNNs" (Katharopoulos et al., 2020) (registered as ``"linear"``).

``phi(Q) (phi(K)^T V)`` normalised by ``phi(Q) phi(K)^T 1``: O(N D^2) instead of O(N^2 D). The causal form is the
recurrence of :mod:`headwise.ops.linear` (chunked fast path ``chunk.py``, token-by-token ``recurrent.py``,
reference ``naive.py``) with ``normalize=True``; the module's reference is :func:`naive_linear`.
:class:`RecurrentMixer` is the forward / prefill / step plumbing that this module and ``lightning``
(:mod:`headwise.variants.lightning`) share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from headwise.checks import check_bool, check_positive_int, check_tokens
from headwise.ops.linear import chunk_linear_attention, recurrent_linear_attention
from headwise.ops.linear.base import NORMALIZER_EPS, apply_normalizer, with_normalizer
from headwise.variants.base import Capabilities, ProjectedAttention, Variant
from headwise.variants.registry import register

__all__ = ["RecurrentMixer", "LinearAttention", "FEATURE_MAPS", "naive_linear"]


class RecurrentMixer(Variant):
    """The shared plumbing of the causal linear-attention modules (``lightning``, causal ``linear``): the whole
    sequence through the chunked op, a prompt through :meth:`prefill`, then one token per :meth:`step`, all one
    recurrence (:mod:`headwise.ops.linear`).

    A subclass provides :meth:`features` ``(x) -> (q, k, v, gate)`` (``q``, ``k``, ``v`` ``[B, H, N, *]`` after the
    feature map; ``gate`` whatever :meth:`readout` needs) and :meth:`readout` ``(o, gate) -> y`` (``o``
    ``[B, H, N, Dv]``), sets ``decay`` (a ``(H,)`` float64 tensor or None) in ``build``, and has a config field
    ``chunk``. ``scale`` and ``normalize`` are the class's constants of the op.
    """

    scale: ClassVar[float] = 1.0  # multiplies the scores in the op
    normalize: ClassVar[bool] = False  # divide by the normalizer q_i . z_i (Katharopoulos et al.)
    decay: Tensor | None = None  # per-head decay (H,) float64, set by build; None: no decay

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, object]:
        """``x`` ``[B, N, C]`` -> ``(q, k, v, gate)``, ``q``, ``k`` ``[B, H, N, D]``, ``v`` ``[B, H, N, Dv]``."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement features(x)")

    def readout(self, o: Tensor, gate) -> Tensor:
        """Head outputs ``o`` ``[B, H, N, Dv]`` (and the ``gate`` of :meth:`features`) -> ``y`` ``[B, N, C]``."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement readout(o, gate)")

    def forward(self, x: Tensor) -> Tensor:
        """``[B, N, C] -> [B, N, C]``, the chunked (Lightning Attention-2) op over the whole sequence."""
        return self.prefill(x)[0]

    def prefill(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run over ``x`` ``[B, N, C]`` (continuing from ``state``, or from zeros); returns ``(y, state)``."""
        check_tokens("x", x, self.config.dim)
        q, k, v, gate = self.features(x)
        o, state = chunk_linear_attention(q, k, v, self.decay, scale=self.scale, normalize=self.normalize,
                                          initial_state=state, output_final_state=True,
                                          block_size=self.config.chunk)  # (B, H, N, Dv)
        return self.readout(o, gate), state

    def step(self, x_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token ``x_t`` ``[B, C]`` through the recurrence from ``state`` (zeros when None): ``(y_t, state)``.

        ``state`` is ``[B, H, D, Dv]`` (``Dv + 1`` with a normalizer), as returned by :meth:`prefill` or a
        previous step.
        """
        dim = self.config.dim
        if not isinstance(x_t, Tensor):
            raise TypeError(f"x_t must be a torch.Tensor [B, C], got {type(x_t).__name__}")
        if x_t.dim() != 2 or x_t.shape[-1] != dim or min(x_t.shape) < 1:
            raise ValueError(f"x_t must be [B, C] with C = dim = {dim}, got x_t.shape={tuple(x_t.shape)}")
        q, k, v, gate = self.features(x_t[:, None])  # (B, H, 1, *)
        o, state = recurrent_linear_attention(q, k, v, self.decay, scale=self.scale, normalize=self.normalize,
                                              initial_state=state, output_final_state=True)  # (B, H, 1, Dv)
        return self.readout(o, gate)[:, 0], state


FEATURE_MAPS = {
    "elu+1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
}


@register("linear")
class LinearAttention(ProjectedAttention, RecurrentMixer):
    r"""Kernelized linear attention (Katharopoulos et al., 2020, "Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention").

    .. math::

        o_i = \frac{\phi(q_i)^\top \sum_j \phi(k_j) v_j^\top}{\phi(q_i)^\top \sum_j \phi(k_j) + \epsilon}

    over all ``j`` (non-causal) or ``j <= i`` (causal, computed by
    :func:`headwise.ops.linear.chunk_linear_attention` with ``normalize=True``), with the feature map ``phi`` =
    ``elu(x) + 1`` (the paper's) or ``relu``, and ``eps = 1e-6``. O(N D^2) time.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; inside, ``[B, H, N, D]``. With ``causal=True`` the module decodes
    (:meth:`prefill`, :meth:`step`) with a state ``[B, H, D, D + 1]`` (the last column is the normalizer
    ``sum_j phi(k_j)``); a non-causal module has no recurrence and raises there.

    Fields (:class:`LinearAttention.Config`): those of :class:`~headwise.variants.base.ProjectedAttention`
    (``dim``, ``heads``, ``head_dim``, ``qkv_bias``, ``out_bias``, ``dropout``; ``kv_heads`` must equal ``heads``),
    ``feature_map`` (``"elu+1"`` or ``"relu"``), ``causal`` (default False) and ``chunk``, the block of the chunked
    causal op (speed only; formerly ``block_size``).

    Choices made here: :meth:`project` returns ``phi(q)``, ``phi(k)`` and ``v`` (the feature map belongs to the
    projection step, so ``attend`` is the linear-attention operator itself); ``eps`` is added to the denominator
    (the paper's guard), which :meth:`attention_weights` leaves out.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("linear(causal=True)", dim=64, heads=4)
        >>> x = torch.randn(2, 30, 64)
        >>> y = m(x)                                                # [2, 30, 64]
        >>> y_prompt, state = m.prefill(x[:, :20])
        >>> y_next, state = m.step(x[:, 20], state)                 # == y[:, 20]
        >>> torch.allclose(y_next, y[:, 20], atol=1e-5)
        True
    """

    fused_qkv_init = True  # initialised as the former qkv_proj (same weights for a given seed)
    capabilities = Capabilities(causal="optional", decode=True, weights="method")
    example_config = {"dim": 16, "heads": 2, "chunk": 3}
    aliases = {"block_size": "chunk"}
    normalize = True  # the recurrence divides by phi(q_i) . sum_j phi(k_j) + eps

    @dataclass
    class Config(ProjectedAttention.Config):
        feature_map: str = "elu+1"  # phi applied to queries and keys: "elu+1" or "relu"
        causal: bool = False  # causal (each token sees itself and the past) or full attention
        chunk: int = 64  # tokens per block of the chunked causal op (speed only, same result)

        def __post_init__(self):
            super().__post_init__()
            if self.kv_heads != self.heads:
                raise ValueError(f"linear attention has one key/value head per query head: kv_heads must equal "
                                 f"heads, got kv_heads={self.kv_heads} heads={self.heads}")
            if self.feature_map not in FEATURE_MAPS:
                raise ValueError(f"unknown feature_map={self.feature_map!r}; valid: {', '.join(map(repr, FEATURE_MAPS))}")
            check_bool("causal", self.causal)
            check_positive_int("chunk", self.chunk)

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """Decodes (prefill / step) only when causal."""
        return dataclasses.replace(cls.capabilities, decode=config.causal)

    def build(self, cfg) -> None:
        super().build(cfg)
        self.phi = FEATURE_MAPS[cfg.feature_map]

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B, N, C]`` -> ``phi(q)``, ``phi(k)``, ``v`` ``[B, H, N, D]`` (the feature map applied)."""
        q, k, v = super().project(x, context)
        return self.phi(q), self.phi(k), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Linear attention of featurized ``q``, ``k`` ``[B, H, N, D]`` over ``v`` -> ``[B, H, N, D]``."""
        if self.config.causal:
            return chunk_linear_attention(q, k, v, None, normalize=True, block_size=self.config.chunk)[0]
        kv = k.transpose(-1, -2) @ with_normalizer(v)  # (B, H, D, Dv + 1): [sum_j phi(k_j) v_j^T, sum_j phi(k_j)]
        return apply_normalizer(q @ kv)  # (B, H, N, Dv)

    def features(self, x: Tensor):
        return (*self.project(x), None)

    def readout(self, o: Tensor, gate) -> Tensor:
        return self.finish(o)  # (B, N, C)

    def prefill(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal modules only: ``x`` ``[B, N, C]`` from ``state`` -> ``(y, state)`` (``[B, H, D, D + 1]``)."""
        self._require_causal("prefill")
        return super().prefill(x, state)

    def step(self, x_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Causal modules only: one token ``x_t`` ``[B, C]`` from ``state`` -> ``(y_t, state)``."""
        self._require_causal("step")
        return super().step(x_t, state)

    def _require_causal(self, what: str) -> None:
        if not self.config.causal:
            raise ValueError(f"{what}() decodes token by token and needs causal=True; this module has causal=False")

    def attention_weights(self, x: Tensor) -> Tensor:
        r"""The attention matrix ``[B, H, N, N]`` over ``x`` ``[B, N, C]`` that the module applies:
        :math:`A_{ij} = \phi(q_i)\cdot\phi(k_j) / (\sum_l \phi(q_i)\cdot\phi(k_l) + \epsilon)` over ``j``
        (``j <= i`` when causal), so ``A V`` is exactly the head output; rows sum to ``1 - eps / S`` (``S`` the
        row's score sum; zeros where every score is zero). ``O(N^2)`` memory, for inspection."""
        q, k, _ = self.project(x)
        scores = q @ k.transpose(-1, -2)  # (B, H, N, N) phi(q_i) . phi(k_j) >= 0
        if self.config.causal:
            scores = scores.tril()
        return scores / (scores.sum(-1, keepdim=True) + NORMALIZER_EPS)  # (B, H, N, N)


def naive_linear(m: LinearAttention, x: Tensor) -> Tensor:
    """The reference of :class:`LinearAttention`, its equation written out with the module's own weights:
    ``F.linear`` projections, ``phi`` on queries and keys, the materialized scores ``phi(q_i) . phi(k_j)`` (lower
    triangle when causal), ``o_i = sum_j a_ij v_j / (sum_j a_ij + 1e-6)``, output projection.
    ``x`` ``[B, N, C]`` -> ``[B, N, C]``; the output dropout is not applied (compare in ``eval()`` mode)."""
    B, N, _ = x.shape
    H, D = m.heads, m.head_dim
    phi = FEATURE_MAPS[m.config.feature_map]
    heads = lambda t: t.reshape(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    q, k, v = (heads(F.linear(x, p.weight, p.bias)) for p in (m.q_proj, m.k_proj, m.v_proj))
    a = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, N, N)
    if m.config.causal:
        a = a.tril()
    o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)  # (B, H, N, D)
    return F.linear(o.transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
