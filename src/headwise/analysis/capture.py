"""Record what every attention head computes, without changing the model's result.

``with capture(model) as rec: model(x)`` records, per attention call, the attention probabilities ``[B, H, n, M]``
(``n`` the kept queries), the head outputs ``[B, H, N, Dv]`` (before the output projection) and optionally the
queries and keys. How a module is captured is what it declares (``capabilities.weights`` of a headwise variant,
:class:`headwise.variants.base.Capabilities`); nothing is tried:

* ``"observed"`` -- its attention goes through :func:`headwise.attention` (``mha``, ``gqa``, ``mqa``, ``moh``, the
  structured windows, ...): the observer list :data:`headwise.core.attention.OBSERVERS` receives ``(q, k, v,
  pattern, scale, out)`` and the probabilities are recomputed from ``q``, ``k``, the pattern and the scale by
  :func:`attention_probs` (materialized scores, the reference formula), so every backend gives the same record.
  The call is credited to the innermost module running at the time (forward pre-hooks keep a stack of module
  names); a module that calls attention several times per forward gets records ``call = 0, 1, ...`` (numbered
  afresh in each forward of the outermost module; calls made outside ``model``'s modules are not recorded).
* ``"method"`` -- the variant computes its own probabilities: ``attention_weights(*forward_args, **forward_kwargs)
  -> [B, H, N, M]`` is called after its forward (no grad), e.g. the sparse selections (``moba``, ``hip``, ``topk``,
  ``dma``, ...: zeros off the selection) and linear attention's normalised matrix (``linear``). ``"scores"``: the
  same, but the matrix is a signed, unnormalised mixing matrix (``lightning``: ``(Q K^T) * M`` before its norm).
  Any other module (yours) that defines ``attention_weights`` is captured the same way (``source="method"``).
* ``"none"`` -- no attention matrix (convolutions, MLP mixers, scans): nothing is recorded for it;
  :meth:`Recorder.modules` lists what was seen.
* :class:`torch.nn.MultiheadAttention`: a forward hook runs the module's own ``forward`` a second time (no
  hooks, no grad) with ``need_weights=True, average_attn_weights=False``; the caller's result is the first,
  untouched call. In training mode with attention dropout the recorded weights are a different dropout draw:
  capture in ``eval()`` mode. Head outputs are not recorded for it.

Memory bounds for long sequences: ``max_queries`` keeps that many evenly spaced query rows (their indices are in
``record.query_index``), ``topk`` keeps the ``k`` largest probabilities per row (``record.topk_indices``;
:meth:`AttentionRecord.dense` scatters them back, zeros elsewhere). Records are detached copies on the CPU.

Example:
    >>> import torch, headwise
    >>> from headwise.analysis import capture
    >>> m = headwise.create("mha", dim=32, heads=4)
    >>> with capture(m) as rec:
    ...     y = m(torch.randn(2, 10, 32))
    >>> rec.records[0].probs.shape                          # [B, H, N, M]
    torch.Size([2, 4, 10, 10])
"""

from __future__ import annotations

import inspect as _inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from headwise.core.attention import OBSERVERS
from headwise.core.checks import default_scale
from headwise.core.reference import masked_softmax
from headwise.patterns.base import Pattern
from headwise.variants.base import Variant

__all__ = ["capture", "Recorder", "AttentionRecord", "attention_probs", "query_subsample", "observing"]


def attention_probs(q: Tensor, k: Tensor, pattern: Pattern | None = None, scale: float | None = None,
                    query_index: Tensor | None = None) -> Tensor:
    """The probabilities :func:`headwise.attention` applies: ``softmax(q k^T * scale | pattern)`` ``[B, H, n, M]``.

    q ``[B, H, N, D]``, k ``[B, H_kv, M, D]`` (GQA by repetition as in the reference). ``query_index`` ``[n]``
    keeps only those query rows (the pattern is evaluated at their true positions). Fully masked rows are zeros.
    Computed in float64 for float64 inputs, float32 otherwise (the reference's accumulation type).
    """
    B, H, N, _ = q.shape
    M = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = torch.arange(N, device=q.device) if query_index is None else query_index.to(q.device)
    q = q[:, :, rows]  # (B, H, n, D)
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, M, D)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * default_scale(q, scale)  # (B, H, n, M)
    mask = None
    if pattern is not None:
        pattern.check(N, M)
        mask = pattern.rows_mask(rows, M)  # (H or 1, n, M)
    return masked_softmax(s, mask)[0]  # (B, H, n, M), empty rows -> 0


def query_subsample(n: int, max_queries: int | None) -> Tensor | None:
    """``max_queries`` evenly spaced indices in ``0 .. n-1`` (first and last included), None to keep all."""
    if max_queries is None or n <= max_queries:
        return None
    return torch.linspace(0, n - 1, max_queries).round().long().unique()


@dataclass
class AttentionRecord:
    """One attention call: who made it and what it computed (detached CPU copies)."""

    module: str  # qualified name of the module that made the call ("" for the root)
    call: int  # index of this call among the module's calls in one forward pass (of the outermost module)
    source: str  # "headwise.attention" (observed), "method" (attention_weights) or "nn.MultiheadAttention"
    n_queries: int  # N, the full number of query rows
    n_keys: int  # M
    probs: Tensor | None = None  # [B, H, n, M] float32 (float64 for float64 models) (None when only the top-k are kept)
    topk_values: Tensor | None = None  # [B, H, n, k]
    topk_indices: Tensor | None = None  # [B, H, n, k] int64
    query_index: Tensor | None = None  # [n] the kept query rows; None: all N rows
    out: Tensor | None = None  # [B, H, N, Dv] head outputs before the output projection
    q: Tensor | None = None  # [B, H, N, D] (keep_qk=True)
    k: Tensor | None = None  # [B, H_kv, M, D] (keep_qk=True)
    pattern: str | None = None  # repr of the pattern, None for full attention

    @property
    def name(self) -> str:
        """``module`` for a module's first call, ``module#call`` for later ones."""
        return self.module if self.call == 0 else f"{self.module}#{self.call}"

    @property
    def heads(self) -> int:
        return (self.probs if self.probs is not None else self.topk_values).shape[1]

    def dense(self) -> Tensor:
        """The probabilities ``[B, H, n, M]``, top-k records scattered into zeros."""
        if self.probs is not None:
            return self.probs
        full = self.topk_values.new_zeros(*self.topk_values.shape[:-1], self.n_keys)
        return full.scatter_(-1, self.topk_indices, self.topk_values)

    def rows(self) -> Tensor:
        """Positions ``[n]`` of the recorded query rows."""
        return torch.arange(self.n_queries) if self.query_index is None else self.query_index


@dataclass
class Recorder:
    """What :func:`capture` saw; ``records`` in call order."""

    records: list[AttentionRecord] = field(default_factory=list)

    def modules(self) -> list[str]:
        """Names of the records (``module`` or ``module#call``), in first-call order, without repeats."""
        return list(dict.fromkeys(r.name for r in self.records))

    def by_name(self) -> dict[str, list[AttentionRecord]]:
        """Records grouped by :attr:`AttentionRecord.name` (one per forward pass captured)."""
        out: dict[str, list[AttentionRecord]] = {}
        for r in self.records:
            out.setdefault(r.name, []).append(r)
        return out

    def maps(self) -> dict[str, Tensor]:
        """Per name, the dense probabilities of its calls concatenated over the batch: ``[sum B, H, n, M]``."""
        return {name: torch.cat([r.dense() for r in recs]) for name, recs in self.by_name().items()}

    def outputs(self) -> dict[str, Tensor]:
        """Per name, the recorded head outputs concatenated over the batch: ``[sum B, H, N, Dv]``."""
        return {name: torch.cat([r.out for r in recs]) for name, recs in self.by_name().items()
                if all(r.out is not None for r in recs)}

    def clear(self) -> None:
        self.records.clear()


def _computes_its_weights(module: nn.Module) -> bool:
    """The module declares ``weights="method"`` or ``"scores"`` (headwise variants), or defines
    ``attention_weights`` (others)."""
    if isinstance(module, Variant):
        return module.caps.weights in ("method", "scores")
    return callable(getattr(module, "attention_weights", None))


# ---- capture --------------------------------------------------------------------------------------------------


def _keep(t: Tensor) -> Tensor:
    """A detached CPU copy, float64 kept as is and anything else as float32."""
    t = t.detach()
    return (t if t.dtype == torch.float64 else t.float()).cpu().clone()


@contextmanager
def observing(fn: Callable) -> Iterator[None]:
    """Register ``fn(q, k, v, pattern, scale, out)`` in :data:`headwise.core.attention.OBSERVERS` while the block
    runs (removed on exit, also after an exception)."""
    OBSERVERS.append(fn)
    try:
        yield
    finally:
        if fn in OBSERVERS:
            OBSERVERS.remove(fn)


def _check_options(max_queries, topk, weights_max_tokens) -> None:
    for name, value in (("max_queries", max_queries), ("topk", topk), ("weights_max_tokens", weights_max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {name}={value!r}")


@contextmanager
def capture(model: nn.Module, *, max_queries: int | None = None, topk: int | None = None, keep_outputs: bool = True,
            keep_qk: bool = False, weights_max_tokens: int = 2048) -> Iterator[Recorder]:
    """Record every attention call inside ``model`` while the ``with`` block runs (see the module docstring).

    Args:
        model: any :class:`torch.nn.Module`.
        max_queries: keep at most this many evenly spaced query rows per call (None: all).
        topk: keep only the ``topk`` largest probabilities of each row (None: the whole row).
        keep_outputs: record the head outputs ``[B, H, N, Dv]`` (headwise.attention calls).
        keep_qk: also record the queries and keys.
        weights_max_tokens: ``attention_weights`` methods (which materialize ``[B, H, N, M]``, often by applying the
            attention to identity values, ``O(N M^2)``) are skipped, with a warning, when the module's input has
            more tokens than this.

    The model's outputs and gradients are unchanged (records are computed under ``torch.no_grad()`` from detached
    tensors). Hooks and the observer are removed on exit, also after an exception.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_options(max_queries, topk, weights_max_tokens)
    rec = Recorder()
    names = {id(m): n for n, m in model.named_modules()}
    by_method = {n for n, m in model.named_modules() if _computes_its_weights(m)}  # recorded by attention_weights
    stack: list[str] = []
    calls: dict[str, int] = {}
    replaying = [False]

    def add(module_name: str, source: str, probs: Tensor, rows: Tensor | None, n_q: int, **extra) -> None:
        call = calls.get(module_name, 0)
        calls[module_name] = call + 1
        r = AttentionRecord(module_name, call, source, n_q, probs.shape[-1], query_index=rows, **extra)
        probs = _keep(probs)
        if topk is not None and topk < probs.shape[-1]:
            r.topk_values, r.topk_indices = probs.topk(topk, dim=-1)
        else:
            r.probs = probs
        rec.records.append(r)

    def observe(q, k, v, pattern, scale, out) -> None:
        if replaying[0] or not stack:  # an attention_weights method's own work, or a call from outside the model
            return
        if stack[-1] in by_method:  # a module that gives its weights itself: its inner calls are not its attention
            return
        with torch.no_grad():
            rows = query_subsample(q.shape[2], max_queries)
            probs = attention_probs(q.detach(), k.detach(), pattern, scale, rows)  # (B, H, n, M)
            extra = {"pattern": None if pattern is None else repr(pattern)}
            if keep_outputs:
                extra["out"] = _keep(out)
            if keep_qk:
                extra["q"], extra["k"] = _keep(q), _keep(k)
            add(stack[-1], "headwise.attention", probs, rows, q.shape[2], **extra)

    def push(module, args):
        if not stack:  # an outermost forward starts: a new pass, call numbers restart
            calls.clear()
        stack.append(names.get(id(module), type(module).__name__))

    def pop(module, args, output):
        if stack:
            stack.pop()

    def torch_mha(module, args, kwargs, output):
        if replaying[0]:
            return
        bound = _inspect.signature(module.forward).bind(*args, **kwargs)
        bound.arguments.update(need_weights=True, average_attn_weights=False)
        replaying[0] = True
        try:
            with torch.no_grad():
                weights = module.forward(*bound.args, **bound.kwargs)[1]  # (B, H, L, S) or (H, L, S)
        finally:
            replaying[0] = False
        weights = weights if weights.dim() == 4 else weights[None]
        rows = query_subsample(weights.shape[2], max_queries)
        add(names[id(module)], "nn.MultiheadAttention", weights if rows is None else weights[:, :, rows], rows,
            weights.shape[2])

    def method_hook(module, args, kwargs, output):
        if replaying[0]:
            return
        n = args[0].shape[1] if args and isinstance(args[0], Tensor) and args[0].dim() >= 2 else 0
        if n > weights_max_tokens:
            warnings.warn(f"capture: {names[id(module)]!r} ({type(module).__name__}) not recorded: its "
                          f"attention_weights builds the full matrix and the input has {n} > {weights_max_tokens=} "
                          f"tokens")
            return
        replaying[0] = True  # attention_weights may run the module's own pieces (and headwise.attention)
        try:
            with torch.no_grad():
                weights = module.attention_weights(*args, **kwargs)  # (B, H, N, M)
        finally:
            replaying[0] = False
        rows = query_subsample(weights.shape[2], max_queries)
        add(names[id(module)], "method", weights if rows is None else weights[:, :, rows], rows, weights.shape[2])

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(push))
            handles.append(module.register_forward_hook(pop, always_call=True))
            if isinstance(module, nn.MultiheadAttention):
                handles.append(module.register_forward_hook(torch_mha, with_kwargs=True))
            elif _computes_its_weights(module):
                handles.append(module.register_forward_hook(method_hook, with_kwargs=True))
        with observing(observe):
            yield rec
    finally:
        for h in handles:
            h.remove()
