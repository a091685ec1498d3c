"""Interventions on heads that leave the weights untouched: context managers that install module hooks.

All of them act on **head-structured modules**: a module with ``heads`` and ``head_dim`` attributes and an
``out_proj`` :class:`torch.nn.Linear` whose input is the concatenation of the ``heads`` head outputs
``[B, N, H * D]`` (``mha``, ``gqa``, ``mqa``, ``gaam_attention``, ``pwca``, ``shared_kv``, ``dictionary_cross``,
``glca`` and any subclass of :class:`headwise.MultiHeadAttention`; list them with :func:`head_modules`). A forward
pre-hook on ``out_proj`` rewrites that input, so the module's own code and weights are untouched and gradients
flow through the hook. :class:`torch.nn.MultiheadAttention` is not head-structured in this sense (its forward
reads ``out_proj.weight`` directly; its hooks would never fire).

* :func:`scale_heads` multiplies head ``h``'s output by ``g_h`` (head reinforcement, VHR-style; ``g_h = 0``
  masks the head). :func:`mask_heads` / :func:`prune_heads` are the 0/1 cases.
* :class:`HardConcreteHeadMask`: trainable gates ``z = min(1, max(0, sigmoid((log u - log(1-u) + log_alpha) /
  beta) (zeta - gamma) + gamma))`` (Louizos et al., 2018, the L0 relaxation GTSP uses for its differentiable head
  masks) with the expected number of open gates ``E[L0] = sum sigmoid(log_alpha - beta log(-gamma / zeta))``
  and a penalty ``((E[L0] - budget) / heads)^2`` that drives it to a head budget.
* :func:`edit_attention` replaces chosen heads' outputs by ``edit(p) @ v`` where ``p`` are the head's attention
  probabilities (recomputed by :func:`headwise.analysis.capture.attention_probs` from the ``q, k`` seen by the
  :data:`headwise.core.attention.OBSERVERS` hook). On it: :func:`redistribute_sinks` (VAR: "See What You Are
  Told: Visual Attention Sink in Large Multimodal Models") and :func:`emphasize_tokens` (token emphasis with
  head-specific modulation: "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large
  Vision-Language Model").
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from headwise.analysis.capture import attention_probs, observing

__all__ = [
    "head_modules",
    "scale_heads",
    "mask_heads",
    "prune_heads",
    "HardConcreteHeadMask",
    "edit_attention",
    "redistribute_sinks",
    "emphasize_tokens",
]

Gates = Mapping[str, Tensor | Sequence[float]] | Callable[[str], Tensor | None]


def _is_head_structured(m: nn.Module) -> bool:
    heads, head_dim, out = getattr(m, "heads", None), getattr(m, "head_dim", None), getattr(m, "out_proj", None)
    return (isinstance(heads, int) and isinstance(head_dim, int) and isinstance(out, nn.Linear)
            and not isinstance(m, nn.MultiheadAttention) and out.in_features == heads * head_dim)


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The head-structured modules of ``model`` by qualified name, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if _is_head_structured(m)}


def _lookup(model: nn.Module, gates: Gates) -> tuple[dict[str, nn.Module], Callable[[str], Tensor | None]]:
    mods = head_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no head-structured module (heads, head_dim and an out_proj "
                         f"Linear over heads * head_dim); see headwise.analysis.interventions")
    if callable(gates):
        return mods, gates
    if not isinstance(gates, Mapping):
        raise TypeError(f"gates must be a mapping from module name to [H] values or a callable, got "
                        f"{type(gates).__name__}")
    unknown = sorted(set(gates) - set(mods))
    if unknown:
        raise ValueError(f"unknown head module name(s) {unknown}; head modules: {sorted(mods)}")
    table = {}
    for name, g in gates.items():
        g = g if isinstance(g, Tensor) else torch.as_tensor(g, dtype=torch.float32)
        if g.shape != (mods[name].heads,):
            raise ValueError(f"gates for {name!r} must have shape [{mods[name].heads}], got {tuple(g.shape)}")
        table[name] = g
    return mods, table.get


@contextmanager
def scale_heads(model: nn.Module, gates: Gates) -> Iterator[dict[str, nn.Module]]:
    """Multiply the output of head ``h`` of module ``name`` by ``gates[name][h]`` while the block runs.

    ``gates``: ``{name: [H] tensor or list}`` (modules not named are untouched), or a callable ``name -> [H]
    tensor or None`` evaluated at every forward (trainable gates, sampled masks). Gradients reach the gates.
    Yields the head-structured modules by name.

    Example:
        >>> import torch, headwise
        >>> from headwise.analysis.interventions import scale_heads
        >>> m = headwise.create("mha", dim=32, heads=4)
        >>> with scale_heads(m, {"": [1.0, 2.0, 1.0, 1.0]}):        # reinforce head 1 of the root module
        ...     y = m(torch.randn(1, 5, 32))
    """
    mods, get = _lookup(model, gates)
    handles = []

    def hook_for(name: str, module: nn.Module):
        def hook(linear, args):
            g = get(name)
            if g is None:
                return None
            x = args[0]  # (B, N, H*D)
            H, D = module.heads, module.head_dim
            y = (x.unflatten(-1, (H, D)) * g.to(x.dtype).to(x.device)[:, None]).flatten(-2)  # (B, N, H*D)
            return (y, *args[1:])

        return hook

    try:
        for name, module in mods.items():
            handles.append(module.out_proj.register_forward_pre_hook(hook_for(name, module)))
        yield mods
    finally:
        for h in handles:
            h.remove()


def _head_set_mask(model: nn.Module, heads: Mapping[str, Sequence[int]], value: float) -> dict[str, Tensor]:
    mods = head_modules(model)
    out = {}
    for name, hs in heads.items():
        if name not in mods:
            raise ValueError(f"unknown head module name {name!r}; head modules: {sorted(mods)}")
        g = torch.full((mods[name].heads,), 1.0 - value)
        for h in hs:
            if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < mods[name].heads:
                raise ValueError(f"head index {h!r} out of range for {name!r} with {mods[name].heads} heads")
            g[h] = value
        out[name] = g
    return out


@contextmanager
def mask_heads(model: nn.Module, mask: Mapping[str, Tensor | Sequence[float]]) -> Iterator[dict[str, nn.Module]]:
    """Keep head ``h`` of ``name`` where ``mask[name][h]`` is 1 (True), silence it where 0: :func:`scale_heads`."""
    with scale_heads(model, {n: torch.as_tensor(m, dtype=torch.float32) for n, m in mask.items()}) as mods:
        yield mods


@contextmanager
def prune_heads(model: nn.Module, heads: Mapping[str, Sequence[int]]) -> Iterator[dict[str, nn.Module]]:
    """Zero the listed heads, ``{name: [head, ...]}``, while the block runs (equivalent to zeroing their columns
    of ``out_proj.weight``)."""
    with scale_heads(model, _head_set_mask(model, heads, 0.0)) as mods:
        yield mods


class HardConcreteHeadMask(nn.Module):
    """Trainable hard-concrete head gates with an L0 penalty towards a head budget (GTSP-style head pruning).

    One ``log_alpha`` per head of every head-structured module of ``model``. In training mode each forward of a
    module draws fresh gates ``z`` (the stretched, clipped binary concrete of Louizos et al., 2018, "Learning
    Sparse Neural Networks through L0 Regularization"); in eval mode the gates are the deterministic
    ``min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``. :meth:`penalty` is
    ``((E[L0] - budget) / total_heads)^2``; add ``weight * penalty()`` to the task loss and train ``log_alpha``
    (the model may stay frozen). :meth:`keep_mask` is the final hard mask: the ``budget`` heads with the largest
    ``log_alpha``.

    Args:
        model: the model whose heads are gated (only used to find the head modules and their head counts).
        budget: heads to keep in total (``1 <= budget <= total heads``).
        beta, gamma, zeta: temperature and stretch interval of the hard concrete (defaults 2/3, -0.1, 1.1, the
            values of Louizos et al.).
        init_keep: initial probability of a gate being open (default 0.9).

    Choices made here: a squared distance to the budget instead of GTSP's exact objective (GTSP's paper text does
    not fix one for heads); the VIB masks of VTrans are not implemented.

    Example:
        >>> import torch, headwise
        >>> from headwise.analysis.interventions import HardConcreteHeadMask
        >>> model = headwise.create("mha", dim=32, heads=4)
        >>> gates = HardConcreteHeadMask(model, budget=2)
        >>> with gates.attach(model):
        ...     loss = model(torch.randn(2, 6, 32)).pow(2).mean() + 0.1 * gates.penalty()
    """

    def __init__(self, model: nn.Module, budget: int, *, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
                 init_keep: float = 0.9):
        super().__init__()
        mods = head_modules(model)
        if not mods:
            raise ValueError(f"{type(model).__name__} has no head-structured module to gate")
        self.names = list(mods)
        self.sizes = [mods[n].heads for n in self.names]
        total = sum(self.sizes)
        if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= total:
            raise ValueError(f"budget must be an int in [1, {total}] (the model's heads), got {budget=}")
        if not (0 < beta and gamma < 0 < 1 < zeta):
            raise ValueError(f"need beta > 0 and gamma < 0 < 1 < zeta, got {beta=} {gamma=} {zeta=}")
        if not 0 < init_keep < 1:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep=}")
        self.budget, self.beta, self.gamma, self.zeta = budget, float(beta), float(gamma), float(zeta)
        self.log_alpha = nn.Parameter(torch.full((total,), math.log(init_keep / (1 - init_keep))))  # (total heads,)
        self.offsets = dict(zip(self.names, [sum(self.sizes[:i]) for i in range(len(self.sizes))]))

    def _slice(self, t: Tensor, name: str) -> Tensor:
        i = self.offsets[name]
        return t[i : i + self.sizes[self.names.index(name)]]

    def gates(self, name: str) -> Tensor:
        """The gates ``[H]`` of module ``name``: a fresh sample in training mode, deterministic in eval mode."""
        la = self._slice(self.log_alpha, name)
        if self.training:
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        else:
            s = torch.sigmoid(la)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def open_probability(self) -> Tensor:
        """``P(z_h > 0)`` for every head, ``[total heads]``."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_heads(self) -> Tensor:
        """``E[L0]``: the expected number of open gates (differentiable)."""
        return self.open_probability().sum()

    def penalty(self) -> Tensor:
        """``((E[L0] - budget) / total heads)^2``."""
        return ((self.expected_heads() - self.budget) / self.log_alpha.numel()) ** 2

    def keep_mask(self) -> dict[str, Tensor]:
        """``{name: [H] float 0/1}`` keeping exactly ``budget`` heads, those with the largest ``log_alpha``."""
        keep = torch.zeros_like(self.log_alpha)
        keep[self.log_alpha.detach().topk(self.budget).indices] = 1.0
        return {n: self._slice(keep, n) for n in self.names}

    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[dict[str, nn.Module]]:
        """Gate ``model``'s heads with :meth:`gates` while the block runs."""
        with scale_heads(model, self.gates) as mods:
            yield mods


# ---- attention edits --------------------------------------------------------------------------------------


Edit = Callable[[str, Tensor], Tensor]  # (module name, p [B, H, N, M]) -> edited p [B, H, N, M]


@contextmanager
def edit_attention(model: nn.Module, edit: Edit, heads: Mapping[str, Sequence[int]] | None = None
                   ) -> Iterator[dict[str, nn.Module]]:
    """Replace the outputs of chosen heads by ``edit(name, p) @ v`` while the block runs.

    ``p`` ``[B, H, N, M]`` are the head-structured module's attention probabilities for its one
    :func:`headwise.attention` call of the forward (recomputed from its ``q``, ``k``, pattern and scale);
    ``heads`` ``{name: [head, ...]}`` picks the heads whose output is replaced (default: every head of every
    head-structured module); other heads keep the backend's output exactly. A module that makes no
    :func:`headwise.attention` call (e.g. ``mha`` with a ``key_padding_mask`` on the dense path) or several in one
    forward raises ``RuntimeError``. Differentiable.
    """
    mods = head_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no head-structured module to edit")
    if heads is None:
        chosen = {name: list(range(m.heads)) for name, m in mods.items()}
    else:
        _head_set_mask(model, heads, 0.0)  # validates names and indices
        chosen = {name: list(hs) for name, hs in heads.items()}
    active: list[str] = []
    seen: dict[str, list] = {}
    handles = []

    def observe(q, k, v, pattern, scale, out):
        if active:
            seen.setdefault(active[-1], []).append((q, k, v, pattern, scale))

    def enter(name):
        def hook(module, args):
            active.append(name)
            seen.pop(name, None)

        return hook

    def leave(module, args, output):
        active.pop()

    def replace(name, module):
        def hook(linear, args):
            calls = seen.get(name, [])
            if len(calls) != 1:
                raise RuntimeError(f"edit_attention needs exactly one headwise.attention call in {name!r} per "
                                   f"forward, saw {len(calls)}")
            q, k, v, pattern, scale = calls[0]
            hs = chosen[name]
            p = edit(name, attention_probs(q, k, pattern, scale))  # (B, H, N, M)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # (B, H, M, Dv)
            o = torch.matmul(p[:, hs].to(v.dtype), v[:, hs])  # (B, h, N, Dv)
            x = args[0].unflatten(-1, (module.heads, module.head_dim)).clone()  # (B, N, H, D)
            x[:, :, hs] = o.transpose(1, 2).to(x.dtype)
            return (x.flatten(-2), *args[1:])

        return hook

    try:
        for name in chosen:
            module = mods[name]
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
            handles.append(module.out_proj.register_forward_pre_hook(replace(name, module)))
        with observing(observe):
            yield mods
    finally:
        for h in handles:
            h.remove()


def _token_index(tokens: Sequence[int] | Tensor, M: int, what: str) -> Tensor:
    idx = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if idx.numel() and (idx.min() < -M or idx.max() >= M):
        raise ValueError(f"{what} indices {idx.tolist()} out of range for {M} keys")
    return idx % M


def redistribute_sinks(p: Tensor, sinks: Sequence[int] | Tensor, targets: Sequence[int] | Tensor,
                       ratio: float = 0.6) -> Tensor:
    r"""VAR's attention redistribution on probabilities ``p`` ``[..., M]``: take the fraction ``ratio`` of the
    attention on the ``sinks`` and give it to the ``targets`` in proportion to their current attention:

    ``p'_sink = (1 - ratio) p_sink``, ``p'_t = p_t + ratio (sum_sinks p) p_t / sum_targets p`` (row sums kept;
    rows with no attention on the targets are left unchanged). Targets that are also sinks receive nothing.
    VAR applies it to its "image-centric" heads only (pick them with
    :func:`headwise.analysis.metrics.target_ratio`) and uses ``ratio`` (its ``p``) of 0.6 in its ablations as we
    read them; use with :func:`edit_attention`, e.g.
    ``edit_attention(model, lambda name, p: redistribute_sinks(p, [0], range(1, 17)), heads=image_heads)``.
    """
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio=}")
    M = p.shape[-1]
    s, t = _token_index(sinks, M, "sink"), _token_index(targets, M, "target")
    t = t[~torch.isin(t, s)]
    moved = p[..., s].sum(-1, keepdim=True) * ratio  # (..., 1)
    pt = p[..., t]  # (..., T)
    total = pt.sum(-1, keepdim=True)
    has = total > 0
    out = p.clone()
    out[..., s] = torch.where(has, p[..., s] * (1 - ratio), p[..., s])
    out[..., t] = torch.where(has, pt + moved * pt / total.clamp_min(torch.finfo(p.dtype).tiny), pt)
    return out


def emphasize_tokens(p: Tensor, tokens: Sequence[int] | Tensor, strength: float, head_weights: Tensor | None = None
                     ) -> Tensor:
    r"""Token emphasis with head-specific modulation on probabilities ``p`` ``[B, H, N, M]``:
    ``p'_ij \propto p_ij (1 + strength\, w_h [j \in T])`` renormalised over ``j``, with ``w_h`` ``[H]`` the head
    weights (default 1: every head alike). The imbalanced-attention paper scales the emphasis per head by the
    head's measured visual sensitivity; :func:`headwise.analysis.metrics.head_divergence` normalised to
    ``[0, 1]`` is one such measure. Its dual-stream token selection is left to the caller (``tokens``).
    Use with :func:`edit_attention`.
    """
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength=}")
    H, M = p.shape[1], p.shape[-1]
    w = torch.ones(H, dtype=p.dtype, device=p.device) if head_weights is None else head_weights.to(p)
    if w.shape != (H,):
        raise ValueError(f"head_weights must have shape [{H}], got {tuple(w.shape)}")
    boost = torch.ones(H, M, dtype=p.dtype, device=p.device)
    boost[:, _token_index(tokens, M, "token")] += strength * w[:, None]
    q = p * boost[:, None, :]  # (B, H, N, M)
    return q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
