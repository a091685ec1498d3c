"""``headwise.attention``: one function for every pattern and backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from headwise.core.checks import check_qkv
from headwise.patterns.base import Causal, Full, Pattern

log = logging.getLogger("headwise.core")

# observers called as fn(q, k, v, pattern, scale, out) after every call, e.g. by headwise.analysis.capture;
# they must not modify their arguments (the check below costs one truthiness test when the list is empty)
OBSERVERS: list[Callable] = []

__all__ = ["attention", "BACKENDS", "choose_backend"]


@dataclass(frozen=True)
class Backend:
    name: str
    can_run: Callable[..., bool]  # (q, k, v, pattern, return_lse) -> bool
    run: Callable  # (q, k, v, pattern, scale, return_lse) -> (out, lse or None)


def _can_reference(q, k, v, pattern, return_lse):
    return True


def _run_reference(q, k, v, pattern, scale, return_lse):
    from headwise.core.reference import naive_attention

    return naive_attention(q, k, v, pattern, scale)


def _can_sdpa(q, k, v, pattern, return_lse):
    return True


def _run_sdpa(q, k, v, pattern, scale, return_lse):
    from headwise.core.sdpa import sdpa_attention

    return sdpa_attention(q, k, v, pattern, scale, return_lse)


def _can_blocksparse(q, k, v, pattern, return_lse):
    from headwise.core import blocksparse

    return blocksparse.can_run(q, k, v, pattern, return_lse)


def _run_blocksparse(q, k, v, pattern, scale, return_lse):
    from headwise.core.blocksparse import blocksparse_attention

    return blocksparse_attention(q, k, v, pattern, scale, return_lse)


def _can_flex(q, k, v, pattern, return_lse):
    from headwise.core import flex

    return flex.can_run(q, k, v, pattern, return_lse)


def _run_flex(q, k, v, pattern, scale, return_lse):
    from headwise.core.flex import flex_attention

    return flex_attention(q, k, v, pattern, scale, return_lse)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", _can_reference, _run_reference),
        Backend("sdpa", _can_sdpa, _run_sdpa),
        Backend("blocksparse", _can_blocksparse, _run_blocksparse),
        Backend("flex", _can_flex, _run_flex),
    )
}

# fraction of computed pairs below which a sparse pattern runs faster on the block-sparse engine than dense masked SDPA
_SPARSE_DENSITY = 0.5
# query x key pairs up to which "auto" takes masked SDPA without scheduling the pattern: building a tile plan
# (about 1.7 ms here) costs more than a dense 256 x 256 masked product (MoH's routed heads call this per example)
_SMALL_PAIRS = 256 * 256


def choose_backend(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, return_lse: bool = False) -> str:
    """The backend ``"auto"`` picks: dense SDPA for full and plain causal attention (its fused kernels are
    the fastest there); for sparse patterns compiled FlexAttention on GPUs and the block-sparse engine on CPU;
    SDPA with a mask when the pattern is too dense for sparsity to pay. The log-sum-exp with gradients (for
    merging partial results in training) always comes from the block-sparse engine."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if return_lse and needs_grad:  # SDPA's fused kernels give no lse gradient; the engine does, in O(N) memory
        return "blocksparse"
    if pattern is None or isinstance(pattern, Full) or (isinstance(pattern, Causal) and pattern.offset == 0):
        return "sdpa"
    if q.device.type == "cuda" and BACKENDS["flex"].can_run(q, k, v, pattern, return_lse):
        return "flex"
    if q.shape[2] * k.shape[2] <= _SMALL_PAIRS:  # scheduling would cost more than the dense masked product
        return "sdpa"
    if BACKENDS["blocksparse"].can_run(q, k, v, pattern, return_lse):
        from headwise.core.blocksparse import computed_fraction

        if computed_fraction(pattern, q.shape[2], k.shape[2]) < _SPARSE_DENSITY:
            return "blocksparse"
    return "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Multi-head attention restricted to a pattern.

    ``out[b, h, i] = sum_j softmax_j(q[b,h,i] . k[b,g,j] * scale | pattern(i, j)) v[b,g,j]`` with
    ``g = h // (H / H_kv)`` (MHA, GQA and MQA by the number of key/value heads).

    Args:
        q: ``[B, H, N, D]`` queries.
        k: ``[B, H_kv, M, D]`` keys, ``H`` a multiple of ``H_kv``.
        v: ``[B, H_kv, M, Dv]`` values (``Dv`` may differ from ``D``).
        pattern: a :class:`headwise.patterns.Pattern`; ``None`` is full attention.
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"`` (default), ``"reference"``, ``"sdpa"``, ``"blocksparse"`` or ``"flex"``.
        return_lse: also return the log-sum-exp of the scores per row, ``[B, H, N]``.

    Returns:
        ``out`` ``[B, H, N, Dv]``, or ``(out, lse)`` with ``return_lse=True``. Query rows the pattern gives no
        key return zeros (and ``lse = -inf``), never NaN.

    Example:
        >>> import torch, headwise
        >>> q = k = v = torch.randn(1, 8, 4096, 64)
        >>> out = headwise.attention(q, k, v, headwise.patterns.SlidingWindow(256))
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"unknown {backend=}; valid: 'auto', " + ", ".join(repr(b) for b in BACKENDS))
    check_qkv(q, k, v, pattern, scale)
    if backend == "auto":
        backend = choose_backend(q, k, v, pattern, return_lse)
        log.debug("attention backend auto -> %s (q %s, pattern %r)", backend, tuple(q.shape), pattern)
    chosen = BACKENDS[backend]
    if not chosen.can_run(q, k, v, pattern, return_lse):
        raise ValueError(f"{backend=} cannot run this case (q {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"pattern {pattern!r}, {return_lse=}); try backend='auto'")
    out, lse = chosen.run(q, k, v, pattern, scale, return_lse)
    if OBSERVERS:
        for observe in tuple(OBSERVERS):
            observe(q, k, v, pattern, scale, out)
    return (out, lse) if return_lse else out
