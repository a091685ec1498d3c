"""MoA's profiler: the attention influence of every head on a calibration batch.

MoA (Fu et al., 2024, Sec. 4 "Automatic pipeline", profiling) scores each attention value ``A_ij`` of each head
by the loss change that masking it would cause, to first order. Masking ``A_ij`` sets it to zero and rescales the
rest of row ``i`` by ``1 / (1 - A_ij)`` (softmax renormalisation), so with ``G = dL/dA``

.. math::

    \\Delta A_{ij} = -A_{ij}, \\qquad \\Delta A_{in} = \\frac{A_{in} A_{ij}}{1 - A_{ij}} \\ (n \\ne j), \\qquad
    E_{ij} = \\sum_n G_{in} \\Delta A_{in} = \\frac{A_{ij}}{1 - A_{ij}} \\Big(\\sum_n G_{in} A_{in} - G_{ij}\\Big).

A head's loss under a rule is the sum of ``E_ij`` over the causal pairs the rule drops, averaged over the
calibration sequences. ``G`` needs the attention probabilities inside the autograd graph, so profiling runs the
dense causal reference (materialized ``[B, H, N, N]`` probabilities): use it on short calibration lengths.

Choices (as in the authors' profiling script, not spelled out in the paper): the magnitude ``|E_ij|`` is
accumulated (``absolute=True``); a row whose only key is ``j`` (``A_ij = 1``, e.g. the first token) cannot be
renormalised and gets ``E_ij = -G_ij A_ij``. The loss is whatever ``loss`` the caller backpropagates, averaged
over the batch (so ``influence`` is the per-sequence mean).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Pattern
from headwise.variants.base import SoftmaxAttention, Variant

__all__ = ["attention_influence", "dense_probabilities", "InfluenceProfiler", "attention_layers"]


def attention_influence(probs: Tensor, grad: Tensor) -> Tensor:
    """MoA's first-order loss change ``E`` ``[..., N, M]`` of masking each attention value.

    ``probs``: attention probabilities ``A`` ``[..., N, M]`` (rows sum to 1 or are all zero);
    ``grad``: ``dL/dA``, same shape. Masked entries (``A = 0``) get ``E = 0``.
    """
    if probs.shape != grad.shape:
        raise ValueError(f"probs and grad must have the same shape, got {tuple(probs.shape)} and {tuple(grad.shape)}")
    row = (grad * probs).sum(-1, keepdim=True)  # (..., N, 1) sum_n G_in A_in
    alone = probs >= 1  # the row's only key: renormalisation impossible
    scale = probs / torch.where(alone, torch.ones_like(probs), 1 - probs)  # (..., N, M) A / (1 - A)
    return torch.where(alone, -grad * probs, scale * (row - grad))


def dense_probabilities(q: Tensor, k: Tensor, pattern: Pattern | None) -> Tensor:
    """Attention probabilities ``[B, H, N, M]`` with gradients to ``q`` and ``k``: the reference
    (:func:`headwise.core.naive_attention`) applied to identity values, so row ``i`` of the output is
    ``softmax_j(q_i . k_j * scale | pattern)``."""
    B, H_kv, M, _ = k.shape
    eye = torch.eye(M, dtype=q.dtype, device=q.device).expand(B, H_kv, M, M)  # (B, H_kv, M, M)
    probs, _ = naive_attention(q, k, eye, pattern)  # (B, H, N, M)
    return probs


def attention_layers(model: nn.Module) -> list[SoftmaxAttention]:
    """The softmax attention layers of ``model`` in registration order (layer 0 first): the headwise variants that
    declare ``capabilities.softmax`` (their attention step is :func:`headwise.attention` between per-token
    projections: ``mha``, ``gqa``, ``mqa``, ``moa``). Any other headwise variant changes the attention itself and
    raises ``ValueError`` (MoA's profile is defined for softmax attention only)."""
    layers = []
    for name, m in model.named_modules():
        if not isinstance(m, Variant):
            continue
        if not m.caps.softmax:
            raise ValueError(f"cannot profile attention layer {name!r} ({type(m).__name__}): MoA profiles "
                             f"softmax multi-head attention (mha, gqa, mqa, moa) only")
        layers.append(m)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no headwise multi-head attention module to profile")
    return layers


class InfluenceProfiler:
    """Context manager: while active, every attention layer of ``model`` runs dense causal attention through the
    reference and keeps its probabilities; :meth:`backward` accumulates the influence of a loss.

    Layers must be causal self-attention: pattern ``Causal()`` (``causal=True``), or causal by construction like
    ``moa`` (profiled as its dense causal model), called without ``context`` or ``key_padding_mask``.

    Attributes (after at least one :meth:`backward`):
        influence: ``[layers, heads, N, N]`` float64, the mean over calibration sequences of ``|E|``
            (or ``E`` with ``absolute=False``).
        steps: number of batches accumulated.

    Example:
        >>> with InfluenceProfiler(model) as prof:                     # doctest: +SKIP
        ...     for tokens in batches:
        ...         prof.backward(lm_loss(model, tokens))
        >>> prof.influence.shape                                      # doctest: +SKIP
        torch.Size([2, 4, 64, 64])
    """

    def __init__(self, model: nn.Module, *, absolute: bool = True):
        if not isinstance(absolute, bool):
            raise TypeError(f"absolute must be a bool, got absolute={absolute!r}")
        self.model, self.absolute = model, absolute
        self.layers = attention_layers(model)
        for i, m in enumerate(self.layers):
            if m.caps.causal != "always" and m.pattern != Causal():
                raise ValueError(f"MoA profiles causal language models: attention layer {i} has pattern="
                                 f"{m.pattern!r}, expected Causal()")
        self._probs: list[Tensor | None] = [None] * len(self.layers)
        self.influence: Tensor | None = None
        self.steps = 0

    def __enter__(self) -> InfluenceProfiler:
        for i, m in enumerate(self.layers):
            m.forward = self._forward_of(i, m)  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc) -> None:
        for m in self.layers:
            del m.forward
        self._probs = [None] * len(self.layers)

    def _forward_of(self, index: int, m: SoftmaxAttention):
        def forward(x: Tensor, context: Tensor | None = None, *, key_padding_mask: Tensor | None = None) -> Tensor:
            if context is not None or key_padding_mask is not None:
                raise ValueError("MoA profiling supports causal self-attention only (no context, no key_padding_mask)")
            q, k, v = m.project(x)  # (B, H, N, D), 2 x (B, H_kv, N, D)
            probs = dense_probabilities(q, k, Causal())  # (B, H, N, N)
            self._probs[index] = probs
            v = v.repeat_interleave(m.heads // m.kv_heads, dim=1)  # (B, H, N, D)
            return m.finish(torch.matmul(probs, v.to(probs.dtype)).to(q.dtype))  # (B, N, C)

        return forward

    def reset(self) -> None:
        """Forget the accumulated influence (to profile another length in the same context)."""
        self.influence, self.steps = None, 0

    def backward(self, loss: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Differentiate ``loss`` (a scalar from a forward pass inside this context) with respect to every layer's
        attention probabilities, accumulate the influence, and return ``[(A, dL/dA)]`` per layer (detached,
        ``[B, H, N, N]``). Parameter gradients are not touched."""
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a scalar tensor, got {loss!r}")
        if any(p is None for p in self._probs):
            missing = [i for i, p in enumerate(self._probs) if p is None]
            raise ValueError(f"attention layers {missing} did not run inside the profiler before backward")
        probs = self._probs
        grads = torch.autograd.grad(loss, probs, allow_unused=True)
        out = []
        for p, g in zip(probs, grads):
            p = p.detach()
            g = torch.zeros_like(p) if g is None else g.detach()
            out.append((p, g))
        shapes = {tuple(p.shape[1:]) for p, _ in out}
        if len(shapes) != 1:
            raise ValueError(f"attention layers disagree on [heads, N, N]: {sorted(shapes)}")
        effects = [attention_influence(p.double(), g.double()) for p, g in out]  # L x (B, H, N, N)
        # per sequence |E| (the loss is a batch mean, so sequence b contributes E_b / B): summing over the batch
        # gives the mean over sequences
        effect = torch.stack([(e.abs() if self.absolute else e).sum(0) for e in effects])  # (L, H, N, N)
        if self.influence is not None and self.influence.shape != effect.shape:
            raise ValueError(f"calibration batches must share one length: got influence {tuple(effect.shape)} "
                             f"after {tuple(self.influence.shape)}")
        # running mean over batches
        self.influence = effect if self.influence is None else self.influence * (self.steps / (self.steps + 1)) \
            + effect / (self.steps + 1)
        self.steps += 1
        self._probs = [None] * len(self.layers)
        return out
