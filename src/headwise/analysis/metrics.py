"""Per-head metrics from captured attention (and from interventions on the model).

Probabilities ``p`` are ``[B, H, n, M]`` (rows = the recorded queries, see
:class:`headwise.analysis.capture.AttentionRecord`); per-head results are ``[H]`` tensors averaged over the batch
and the queries.

* :func:`entropy`: ``-sum_j p_ij log p_ij`` (nats, ``0 log 0 = 0``).
* :func:`mean_distance`: ``sum_j p_ij d(i, j)`` over tokens with a position, renormalised over them: the ViT
  "mean attention distance" (1-D ``|i - j|``, or Euclidean on an image grid with :func:`token_positions`).
* :func:`distance_profile`: attention mass per distance bin (the visual-analytics paper's spatial profile).
* :func:`token_attention`: mass on chosen (special) tokens. :func:`target_ratio`: VAR's head selection.
* :func:`attention_sinks` / :func:`massive_activations`: sink heads and tokens (keys receiving most of the
  attention whatever the query; tokens with massive hidden-state activations).
* :func:`pruning_importance` (loss increase when one head is masked), :func:`gradient_importance` (expected
  ``|d loss / d g_h|`` of a head gate ``g = 1``; Michel et al., 2019), :func:`gaam_importance` (GAAM's
  Importance Factor), :func:`head_divergence` (VHD generalised to any removed segment).
* :func:`attention_rollout` and :func:`attention_flow` (Abnar & Zuidema, 2020) across layers.
* :func:`kq_ov_circuits` / :func:`icl_patterns`: the per-head KQ and OV matrices of a softmax module and the
  statistics of the patterns "In-Context Linear Regression Demystified" finds (diagonal, homogeneous KQ;
  last-entry-only, zero-sum OV).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from headwise.analysis.capture import capture
from headwise.analysis.interventions import head_modules, prune_heads, scale_heads
from headwise.variants.base import Variant

__all__ = [
    "entropy",
    "token_positions",
    "mean_distance",
    "distance_profile",
    "token_attention",
    "target_ratio",
    "attention_sinks",
    "massive_activations",
    "pruning_importance",
    "gradient_importance",
    "gaam_importance",
    "head_divergence",
    "attention_rollout",
    "attention_flow",
    "kq_ov_circuits",
    "icl_patterns",
]


def _check_probs(p: Tensor) -> None:
    if not isinstance(p, Tensor) or p.dim() != 4:
        got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
        raise ValueError(f"p must be attention probabilities [B, H, n, M], got {got}")


def _per_head(x: Tensor) -> Tensor:
    """``[B, H, n]`` -> ``[H]``: the mean over batch and rows, ignoring NaN rows."""
    x = x.transpose(0, 1).flatten(1)  # (H, B*n)
    ok = ~torch.isnan(x)
    return torch.where(ok, x, 0).sum(1) / ok.sum(1).clamp_min(1)


def entropy(p: Tensor) -> Tensor:
    """Mean attention entropy per head, ``[H]`` (nats). A one-hot row has entropy 0; uniform over ``M`` keys,
    ``log M``. All-zero (fully masked) rows count as 0."""
    _check_probs(p)
    return _per_head(-(p * torch.log(torch.where(p > 0, p, 1))).sum(-1))


def token_positions(n: int, grid: Sequence[int] | None = None, prefix: int = 0) -> Tensor:
    """Coordinates ``[n, d]`` of ``n`` tokens: ``prefix`` special tokens (NaN: no position) then the rest on a
    1-D line (``grid`` None) or row-major on ``grid`` (e.g. ``(14, 14)`` patches after one class token)."""
    if prefix < 0 or prefix > n:
        raise ValueError(f"prefix must be in [0, {n=}], got {prefix=}")
    rest = n - prefix
    if grid is None:
        pos = torch.arange(rest, dtype=torch.float64)[:, None]  # (rest, 1)
    else:
        grid = tuple(int(g) for g in grid)
        if int(torch.tensor(grid).prod()) != rest:
            raise ValueError(f"{grid=} does not multiply to the {rest} tokens after {prefix=} (n={n})")
        axes = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
        pos = torch.stack([a.flatten() for a in axes], -1)  # (rest, d)
    return torch.cat([torch.full((prefix, pos.shape[1]), float("nan"), dtype=torch.float64), pos])


def _distances(positions: Tensor, rows: Tensor | None, M: int) -> Tensor:
    """``[n, M]`` distances between the recorded query rows and the keys (NaN where either has no position)."""
    if positions.shape[0] < M:
        raise ValueError(f"positions has {positions.shape[0]} tokens, fewer than the {M} keys")
    kp = positions[:M]  # (M, d)
    qp = positions if rows is None else positions[rows]  # (n, d)
    return torch.linalg.vector_norm(qp[:, None] - kp[None], dim=-1)  # (n, M)


def mean_distance(p: Tensor, positions: Tensor | None = None, rows: Tensor | None = None) -> Tensor:
    """Mean attention distance per head ``[H]``: ``sum_j p_ij d(i, j) / sum_j p_ij`` over keys with a position,
    averaged over the query rows with a position. ``positions`` from :func:`token_positions` (default the 1-D
    line); ``rows`` the recorded query positions (``record.query_index``; None: all)."""
    _check_probs(p)
    M = p.shape[-1]
    n = p.shape[2] if rows is None else int(rows.max()) + 1
    positions = token_positions(max(M, n)) if positions is None else positions
    d = _distances(positions, rows, M).to(p.dtype)  # (n, M)
    valid = ~torch.isnan(d)
    w = p * valid  # (B, H, n, M)
    mass = w.sum(-1)  # (B, H, n)
    md = (w * torch.where(valid, d, 0)).sum(-1) / mass.clamp_min(torch.finfo(p.dtype).tiny)
    return _per_head(torch.where(mass > 0, md, float("nan")))


def distance_profile(p: Tensor, positions: Tensor | None = None, rows: Tensor | None = None,
                     max_distance: int | None = None) -> Tensor:
    """Attention mass per distance ``[H, K]``: entry ``[h, b]`` is the mean over queries of the attention head
    ``h`` puts on keys at distance ``d`` with ``round(d) = b`` (``K = max_distance + 1``, default the largest
    distance present). Tokens without a position are left out."""
    _check_probs(p)
    M = p.shape[-1]
    n = p.shape[2] if rows is None else int(rows.max()) + 1
    positions = token_positions(max(M, n)) if positions is None else positions
    d = _distances(positions, rows, M)  # (n, M)
    valid = ~torch.isnan(d)
    b = torch.where(valid, d, 0).round().long()  # (n, M)
    K = int(b[valid].max()) + 1 if max_distance is None and bool(valid.any()) else (max_distance or 0) + 1
    keep = valid & (b < K)
    onehot = torch.zeros(*b.shape, K, dtype=p.dtype)
    onehot[keep] = torch.nn.functional.one_hot(b[keep], K).to(p.dtype)  # (n, M, K)
    mass = torch.einsum("bhnm,nmk->bhnk", p, onehot)  # (B, H, n, K)
    qvalid = valid.any(-1)  # query rows with a position
    return mass[:, :, qvalid].mean((0, 2))  # (H, K)


def token_attention(p: Tensor, tokens: Sequence[int] | Tensor) -> Tensor:
    """Mean attention mass per head on the given key indices (e.g. ``[0]`` for a class/BOS token), ``[H]``."""
    _check_probs(p)
    idx = torch.as_tensor(tokens, dtype=torch.long).flatten() % p.shape[-1]
    return _per_head(p[..., idx].sum(-1))


def target_ratio(p: Tensor, targets: Sequence[int] | Tensor, sinks: Sequence[int] | Tensor = ()) -> Tensor:
    """VAR's head selection statistic ``[H]``: attention on the non-sink targets divided by attention on all
    non-sink tokens (VAR calls heads with a high ratio "image-centric", with the image tokens as targets)."""
    _check_probs(p)
    M = p.shape[-1]
    s = torch.as_tensor(sinks, dtype=torch.long).flatten() % M
    t = torch.as_tensor(targets, dtype=torch.long).flatten() % M
    t = t[~torch.isin(t, s)]
    non_sink = p.sum(-1) - p[..., s].sum(-1)
    ratio = p[..., t].sum(-1) / non_sink.clamp_min(torch.finfo(p.dtype).tiny)
    return _per_head(torch.where(non_sink > 0, ratio, float("nan")))


def attention_sinks(p: Tensor, threshold: float = 0.5) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Sinks: keys that receive most of a head's attention on average over every query, whatever its content.

    Returns ``(received [H, M], sink_head [H] bool, sink_tokens)``: ``received[h, j]`` the mean attention key
    ``j`` gets in head ``h``; a head is a sink head when some key receives at least ``threshold`` of it;
    ``sink_tokens[h]`` those keys. The VAR paper also asks that sink tokens carry massive activations:
    intersect with :func:`massive_activations` where hidden states are at hand."""
    _check_probs(p)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold=}")
    received = p.mean((0, 2))  # (H, M)
    sinks = [torch.nonzero(r >= threshold).flatten().tolist() for r in received]
    return received, torch.tensor([bool(s) for s in sinks]), sinks


def massive_activations(hidden: Tensor, ratio: float = 100.0) -> Tensor:
    """Tokens with massive activations ``[B, N]`` bool: ``max_c |h_{n,c}| >= ratio * median |h|`` over the
    whole ``hidden`` ``[B, N, C]`` (the criterion of Sun et al., 2024, "Massive Activations in Large Language
    Models", that VAR builds on; they use 100 and a 1000x-median ratio: pass what fits your model)."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, N, C], got {getattr(hidden, 'shape', type(hidden).__name__)}")
    a = hidden.detach().abs()
    return a.amax(-1) >= ratio * a.median()


# ---- importance -----------------------------------------------------------------------------------------


def _mean_loss(loss_fn: Callable[[Any], Tensor], batches: Sequence[Any]) -> float:
    return sum(float(loss_fn(b)) for b in batches) / len(batches)


def pruning_importance(model: nn.Module, loss_fn: Callable[[Any], Tensor], batches: Iterable[Any]) -> dict[str, Tensor]:
    """Loss increase when one head is masked: ``{name: [H]}`` with ``loss(head h of name pruned) - loss``,
    the loss averaged over ``batches`` (``loss_fn(batch) -> scalar``). ``L * H + 1`` passes over the batches,
    under ``torch.no_grad()``. The visual-analytics paper's pruning-based importance (it also uses accuracy drop;
    pass a ``loss_fn`` that returns ``1 - accuracy`` for that)."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    out = {}
    with torch.no_grad():
        base = _mean_loss(loss_fn, batches)
        for name, module in head_modules(model).items():
            scores = torch.zeros(module.heads, dtype=torch.float64)
            for h in range(module.heads):
                with prune_heads(model, {name: [h]}):
                    scores[h] = _mean_loss(loss_fn, batches) - base
            out[name] = scores
    return out


def gradient_importance(model: nn.Module, loss_fn: Callable[[Any], Tensor], batches: Iterable[Any]) -> dict[str, Tensor]:
    """Expected ``|d loss / d g_h|`` of a gate ``g_h = 1`` on each head's output (Michel et al., 2019, "Are
    Sixteen Heads Really Better than One?"): ``{name: [H]}``, the absolute gradient averaged over ``batches``.
    Model parameter gradients are not accumulated."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    gates = {name: torch.ones(m.heads, requires_grad=True) for name, m in head_modules(model).items()}
    total = {name: torch.zeros(g.shape[0], dtype=torch.float64) for name, g in gates.items()}
    with scale_heads(model, gates):
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(batch), list(gates.values()), allow_unused=True)
            for name, g in zip(gates, grads):
                if g is not None:
                    total[name] += g.detach().abs().double()
    return {name: t / len(batches) for name, t in total.items()}


def gaam_importance(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """GAAM's Importance Factor of every ``gaam`` module after a forward: ``{name: {"if": [N, C], "per_head":
    [H]}}`` (the module's min-max normalised mean density, and its mean over each head's ``C / H`` channels).
    Modules that have not run yet are skipped."""
    from headwise.variants.gaam import GaussianAdaptiveAttention

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, GaussianAdaptiveAttention) and m.importance_factor is not None:
            f = m.importance_factor.detach().cpu()  # (N, C)
            out[name] = {"if": f, "per_head": f.unflatten(-1, (m.config.heads, -1)).mean((0, 2))}
    return out


def head_divergence(model: nn.Module, forward: Callable[[Tensor], Any], x: Tensor, segment: Sequence[int] | slice,
                    queries: Sequence[int] = (-1,)) -> dict[str, Tensor]:
    """How much each head's output changes when a segment of the context is removed: ``{name: [H]}``.

    Runs ``forward(x)`` and ``forward(x without the tokens in segment)`` (tokens along dim 1 of ``x``, e.g.
    token ids ``[B, N]`` or features ``[B, N, C]``) under :func:`capture`, and returns
    ``mean_{b, i} || o_h(x)_i - o_h(x \\ segment)_i ||_2`` over the ``queries`` (positions in the full sequence,
    default the last token), for every self-attention record whose length follows the input.

    The VHD metric of "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" is this with
    the image tokens as the segment and the generated token as the query; we generalise to any segment.
    """
    N = x.shape[1]
    drop = torch.zeros(N, dtype=torch.bool)
    drop[torch.arange(N)[segment] if isinstance(segment, slice) else torch.as_tensor(segment, dtype=torch.long)] = True
    if bool(drop.all()) or not bool(drop.any()):
        raise ValueError(f"segment must remove some but not all of the {N} tokens, got {segment=}")
    keep = ~drop
    new_index = torch.cumsum(keep.long(), 0) - 1  # position of a kept token in the shortened sequence
    qs = torch.as_tensor(queries, dtype=torch.long) % N
    if bool(drop[qs].any()):
        raise ValueError(f"queries {qs.tolist()} must not lie in the removed segment")
    with torch.no_grad():
        with capture(model) as full:
            forward(x)
        with capture(model) as cut:
            forward(x[:, keep])
    a, b = full.outputs(), cut.outputs()
    out = {}
    for name, oa in a.items():
        ob = b.get(name)
        if ob is None or oa.shape[2] != N or ob.shape[2] != int(keep.sum()) or oa.shape[:2] != ob.shape[:2]:
            continue
        diff = oa[:, :, qs] - ob[:, :, new_index[qs]]  # (B, H, q, Dv)
        out[name] = torch.linalg.vector_norm(diff, dim=-1).mean((0, 2))
    return out


# ---- across layers ---------------------------------------------------------------------------------------


def _head_aggregate(maps: Sequence[Tensor], head_weights: Sequence[Tensor] | None) -> list[Tensor]:
    """Per layer ``sum_h w_h A_h`` (default the head mean), ``[B, N, N]`` each, after checking the shapes."""
    if not maps:
        raise ValueError("maps is empty: need one [B, H, N, N] attention per layer")
    if head_weights is not None and len(head_weights) != len(maps):
        raise ValueError(f"head_weights has {len(head_weights)} entries for {len(maps)} layers")
    out = []
    for i, a in enumerate(maps):
        _check_probs(a)
        if a.shape[2] != a.shape[3] or a.shape[2:] != maps[0].shape[2:]:
            raise ValueError(f"maps[{i}] must be square [B, H, N, N] with one N for all layers, got {tuple(a.shape)}")
        w = torch.full((a.shape[1],), 1 / a.shape[1], dtype=a.dtype) if head_weights is None else head_weights[i].to(a)
        out.append(torch.einsum("bhij,h->bij", a, w))  # (B, N, N)
    return out


def attention_rollout(maps: Sequence[Tensor], head_weights: Sequence[Tensor] | None = None) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): ``R = A_L ... A_1`` with ``A_l = 0.5 mean_h A_{l,h} + 0.5 I``,
    ``[B, N, N]``; ``R[b, i, j]`` is how much output token ``i`` draws on input token ``j``. ``maps``: one
    ``[B, H, N, N]`` per layer, first layer first. ``head_weights``: optional ``[H]`` per layer replacing the head
    mean (VL-SAM-style head aggregation). The product is :func:`headwise.ops.selection.tokens.attention_rollout`
    (shared with DCAL's token selection)."""
    from headwise.ops.selection.tokens import attention_rollout as rollout

    return rollout(_head_aggregate(maps, head_weights))


def attention_flow(maps: Sequence[Tensor], sources: Sequence[int] | None = None,
                   head_weights: Sequence[Tensor] | None = None, resolution: float = 1e6) -> Tensor:
    """Attention flow (Abnar & Zuidema, 2020): the maximum flow from output token ``i`` to input token ``j`` in
    the layered graph whose edges ``(l+1, i) -> (l, j)`` have capacity ``A_l[i, j]``, ``A_l = 0.5 mean_h A_{l,h} +
    0.5 I`` as in :func:`attention_rollout`: ``[B, len(sources), N]`` (``sources`` default all tokens).

    One max-flow per (batch element, source, target): ``B * S * N`` calls of
    :func:`scipy.sparse.csgraph.maximum_flow` on ``(L + 1) N`` nodes, so keep ``N`` to a few dozen tokens and
    ``L`` small. scipy needs integer capacities: they are ``round(A * resolution)``, so flows are exact to about
    ``L * N / resolution``. Needs scipy (a dev dependency of headwise). VL-SAM's regularised flow differs (it
    also reweights the layers); this is the original definition.
    """
    try:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow
    except ImportError as e:  # pragma: no cover - scipy is a dev dependency
        raise ImportError("attention_flow needs scipy (pip install scipy)") from e
    fused = [0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype) for a in _head_aggregate(maps, head_weights)]
    B, N, L = fused[0].shape[0], fused[0].shape[-1], len(fused)
    srcs = list(range(N)) if sources is None else [int(s) % N for s in sources]
    out = torch.zeros(B, len(srcs), N, dtype=torch.float64)
    node = lambda layer, tok: layer * N + tok  # noqa: E731
    for b in range(B):
        rows, cols, caps = [], [], []
        for layer, a in enumerate(fused):  # edges from layer+1 (outputs) to layer (inputs)
            cap = (a[b].double() * resolution).round().long()
            i, j = torch.nonzero(cap > 0, as_tuple=True)
            rows += [node(layer + 1, t) for t in i.tolist()]
            cols += [node(layer, t) for t in j.tolist()]
            caps += cap[i, j].tolist()
        graph = csr_matrix((torch.tensor(caps, dtype=torch.int32).numpy(), (rows, cols)),
                           shape=((L + 1) * N, (L + 1) * N))
        for si, s in enumerate(srcs):
            for t in range(N):
                out[b, si, t] = maximum_flow(graph, node(L, s), node(0, t)).flow_value / resolution
    return out


# ---- weights: KQ and OV circuits ----------------------------------------------------------------------------


def is_softmax_attention(module: nn.Module) -> bool:
    """A headwise variant whose attention step is plain softmax attention between per-token projections."""
    return isinstance(module, Variant) and module.caps.softmax


def kq_ov_circuits(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-head bilinear forms of a softmax attention variant (``capabilities.softmax``: ``mha``, ``gqa``, ``mqa``,
    ``moa``; its ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``): ``KQ [H, C, C]`` with
    ``score_h(i, j) = x_i^T KQ_h x_j`` (``W_Q,h^T W_K,g(h)``, before the ``1/sqrt(D)`` scale; biases left out) and
    ``OV [H, C, C]`` with head ``h`` writing ``OV_h x_j`` for each unit of attention on token ``j``
    (``W_O,h W_V,g(h)``)."""
    if not is_softmax_attention(module):
        raise TypeError(f"kq_ov_circuits reads softmax attention variants (capabilities.softmax: mha, gqa, mqa, moa), "
                        f"got {type(module).__name__}")
    H, Hkv, D = module.heads, module.kv_heads, module.head_dim
    wq = module.q_proj.weight.detach().unflatten(0, (H, D))  # (H, D, C)
    wk = module.k_proj.weight.detach().unflatten(0, (Hkv, D))  # (Hkv, D, C)
    wv = module.v_proj.weight.detach().unflatten(0, (Hkv, D))  # (Hkv, D, C)
    g = torch.arange(H) // (H // Hkv)
    wo = module.out_proj.weight.detach().unflatten(1, (H, D)).transpose(0, 1)  # (H, C, D)
    return wq.transpose(1, 2) @ wk[g], wo @ wv[g]


def icl_patterns(kq: Tensor, ov: Tensor, d: int) -> dict[str, Tensor]:
    """The in-context-regression patterns on tokens ``z = (x, y)`` with ``x`` in coordinates ``0..d-1`` and ``y`` at
    coordinate ``d`` (the prediction is read there too):

    * ``kq_diagonal [H]``: share of ``|KQ_h[:d, :d]|`` on its diagonal (1: diagonal);
    * ``kq_homogeneity``: std / |mean| of the diagonal entries over ``x``-coordinates and heads (0: homogeneous);
    * ``ov_last_entry [H]``: share of ``|OV_h|`` in the entry ``(d, d)``, i.e. ``y`` in, ``y`` out (1: last-entry-only);
    * ``ov_zero_sum``: ``|sum_h OV_h[d, d]| / sum_h |OV_h[d, d]|`` (0: the heads' values cancel, "zero-sum").
    """
    if kq.dim() != 3 or ov.shape != kq.shape or not 0 < d < kq.shape[-1]:
        raise ValueError(f"need kq, ov [H, C, C] and 0 < d < C, got {tuple(kq.shape)}, {tuple(ov.shape)}, {d=}")
    block = kq[:, :d, :d].abs()  # (H, d, d)
    diag = torch.diagonal(kq[:, :d, :d], dim1=1, dim2=2)  # (H, d)
    last = ov[:, d, d]  # (H,)
    return {
        "kq_diagonal": torch.diagonal(block, dim1=1, dim2=2).sum(-1) / block.sum((1, 2)),
        "kq_homogeneity": diag.std() / diag.mean().abs(),
        "ov_last_entry": last.abs() / ov.abs().sum((1, 2)),
        "ov_zero_sum": last.sum().abs() / last.abs().sum(),
    }
