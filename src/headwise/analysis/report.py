"""``headwise inspect``: every metric of :mod:`headwise.analysis` on one model, as JSON, PNG plots and one HTML page.

:func:`inspect_model` takes a :class:`Subject` (a model, a few batches, how to run it and, optionally, a loss) and
writes into ``out``:

* ``metrics.json`` (validated against :data:`headwise.analysis.schema.METRICS_SCHEMA`, written beside it as
  ``metrics.schema.json``): per attention layer (capture record name) and head: entropy, mean attention distance,
  attention on the special tokens, sink heads and tokens, pruning and gradient importance (with a loss), head
  divergence (with a segment), the distance profile and massive-activation tokens; attention rollout and flow
  (small ``N``); head clusters; GAAM Importance Factors.
* PNGs (matplotlib, Agg backend): layer x head heatmaps of each metric, the attention maps of the most important
  heads, distance profiles per layer, cluster representatives, rollout (over the image grid when there is one).
* ``report.html``: one static page embedding the PNGs and a table of the top heads.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from headwise.analysis import metrics as M
from headwise.analysis.capture import Recorder, capture
from headwise.analysis.clustering import cluster_heads
from headwise.analysis.interventions import head_modules
from headwise.analysis.schema import METRICS_SCHEMA, check

__all__ = ["Subject", "inspect_model", "write_html", "referenced_images"]


@dataclass
class Subject:
    """What :func:`inspect_model` needs to know about a model."""

    model: nn.Module  # the model (put in eval mode by inspect_model)
    batches: Sequence[Any]  # a few inputs, each passed to forward (and loss)
    forward: Callable[[Any], Any]  # batch -> output (runs the model once)
    loss: Callable[[Any], Tensor] | None = None  # batch -> scalar loss; enables pruning and gradient importance
    name: str = "model"  # shown in the report
    task: dict = field(default_factory=dict)  # description of the task (free-form, JSON-serialisable)
    training: dict = field(default_factory=dict)  # how the model was trained (free-form, JSON-serialisable)
    grid: tuple[int, ...] | None = None  # token grid after the prefix tokens (2-D distances, rollout images)
    prefix: int = 0  # special tokens before the grid/sequence tokens (no position)
    special_tokens: Sequence[int] = (0,)  # key indices whose received attention is reported
    divergence: tuple[Callable[[Tensor], Any], Tensor, slice] | None = None  # (forward on tokens, tokens, segment)
    flow_sources: Sequence[int] | None = None  # output tokens for attention flow (default: the last token)
    icl_dim: int | None = None  # in-context regression tokens (x in 0..d-1, y at d): report KQ / OV patterns


def _list(t: Tensor | None) -> list | None:
    """A tensor as nested lists of Python floats, NaN/inf as None (JSON has no NaN)."""
    if t is None:
        return None
    return [_list(x) for x in t] if t.dim() > 1 else [None if not math.isfinite(v) else float(v) for v in t.tolist()]


def _positions(subject: Subject, n: int) -> Tensor | None:
    if subject.grid is not None and n == subject.prefix + math.prod(subject.grid):
        return M.token_positions(n, subject.grid, subject.prefix)
    return M.token_positions(n, None, min(subject.prefix, n))


def _layer_of(head_module: str, layers: dict) -> str | None:
    """The capture record a head-structured module's numbers belong to: the record of the module itself or of the
    nearest enclosing module (variants that keep their projections in a submodule, e.g. ``topk``'s ``mha``)."""
    owners = [n for n in layers if "#" not in n and (n == head_module or n == "" or head_module.startswith(n + "."))]
    return max(owners, key=len) if owners else None


def _hidden_inputs(model: nn.Module, names: Sequence[str]):
    """Forward pre-hooks grabbing the ``[B, N, C]`` input of the named modules: ``(store, handles)``."""
    mods = dict(model.named_modules())
    store: dict[str, list[Tensor]] = {}
    handles = []
    for name in names:
        base = name.split("#")[0]
        if base in mods:
            def hook(module, args, name=base):
                if args and isinstance(args[0], Tensor) and args[0].dim() == 3:
                    store.setdefault(name, []).append(args[0].detach().float().cpu())
            handles.append(mods[base].register_forward_pre_hook(hook))
    return store, handles


def _capture_all(subject: Subject, max_queries: int | None) -> tuple[Recorder, dict[str, Tensor]]:
    with torch.no_grad(), capture(subject.model, max_queries=max_queries, keep_outputs=False) as rec:
        store, handles = _hidden_inputs(subject.model, [n for n, _ in subject.model.named_modules()])
        try:
            for batch in subject.batches:
                subject.forward(batch)
        finally:
            for h in handles:
                h.remove()
    return rec, {name: torch.cat(xs) for name, xs in store.items() if len({x.shape[1:] for x in xs}) == 1}


def inspect_model(subject: Subject, out: str | Path, *, max_queries: int | None = 64, clusters: int = 4,
                  sink_threshold: float = 0.5, massive_ratio: float = 100.0, flow_max_tokens: int = 64,
                  rollout_max_tokens: int = 256, top_heads: int = 4, figures: bool = True) -> dict:
    """Compute every metric on ``subject`` and write ``metrics.json``, ``metrics.schema.json``, the PNGs and
    ``report.html`` into ``out`` (created). Returns the metrics dict (as written). ``figures=False`` skips the
    PNGs (the page then has the tables only).

    Rollout and flow chain the first attention call of every module whose queries are its keys, in call order
    (a variant that splits its heads over several calls contributes its first call); they are skipped beyond
    ``rollout_max_tokens`` / ``flow_max_tokens`` tokens, and the pruning / gradient importance needs
    ``subject.loss`` and head-structured modules (:func:`headwise.analysis.interventions.head_modules`).
    Skipped parts are listed in ``notes``."""
    import matplotlib

    matplotlib.use("Agg")
    if not subject.batches:
        raise ValueError("subject.batches is empty: need at least one input batch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = subject.model.eval()
    notes: list[str] = []
    rec, hidden = _capture_all(subject, max_queries)
    if not rec.records:
        raise ValueError(f"no attention was captured in {type(model).__name__}: see headwise.analysis.capture for "
                         "the modules it can read")
    grouped = rec.by_name()
    maps = rec.maps()  # name -> (sum B, H, n, M)
    rows = {name: recs[0].query_index for name, recs in grouped.items()}
    layers: dict[str, dict] = {}
    for name, p in maps.items():
        p = p.double()
        positions = _positions(subject, grouped[name][0].n_queries) if p.shape[-1] == grouped[name][0].n_queries else None
        _, sink_head, sink_tokens = M.attention_sinks(p, sink_threshold)
        entry = {
            "heads": p.shape[1],
            "source": grouped[name][0].source,
            "entropy": _list(M.entropy(p)),
            "mean_distance": _list(M.mean_distance(p, positions, rows[name])) if positions is not None else [None] * p.shape[1],
            "special_attention": _list(M.token_attention(p, [t for t in subject.special_tokens if -p.shape[-1] <= t < p.shape[-1]])),
            "sink_head": [bool(s) for s in sink_head],
            "sink_tokens": sink_tokens,
            "pruning_importance": None,
            "gradient_importance": None,
            "divergence": None,
        }
        if positions is not None:
            entry["distance_profile"] = _list(M.distance_profile(p, positions, rows[name]))
        base = name.split("#")[0]
        if base in hidden:
            flagged = M.massive_activations(hidden[base], massive_ratio).any(0)
            entry["massive_activation_tokens"] = torch.nonzero(flagged).flatten().tolist()
        layers[name] = entry

    heads_by_module = head_modules(model)
    if subject.loss is not None and heads_by_module:
        for key, fn in (("pruning_importance", M.pruning_importance), ("gradient_importance", M.gradient_importance)):
            for name, scores in fn(model, subject.loss, subject.batches).items():
                layer = _layer_of(name, layers)
                if layer is not None and layers[layer]["heads"] == len(scores):
                    layers[layer][key] = _list(scores)
    elif subject.loss is None:
        notes.append("no loss given: pruning and gradient importance not computed")
    else:
        notes.append("no head-structured module (heads, head_dim, out_proj): importance not computed")
    if subject.icl_dim is not None:
        for name, module in heads_by_module.items():
            layer = _layer_of(name, layers)
            if layer is not None and M.is_softmax_attention(module):
                stats = M.icl_patterns(*M.kq_ov_circuits(module), subject.icl_dim)
                layers[layer].update({k: _list(v) if v.dim() else (float(v) if math.isfinite(v) else None)
                                     for k, v in stats.items()})
    if subject.divergence is not None:
        fwd, tokens, segment = subject.divergence
        for name, d in M.head_divergence(model, fwd, tokens, segment).items():
            if name in layers:
                layers[name]["divergence"] = _list(d)

    rollout = flow = None
    square = [n for n, recs in grouped.items() if "#" not in n and recs[0].n_queries == recs[0].n_keys]
    sizes = {grouped[n][0].n_keys for n in square}
    if not square or len(sizes) != 1:
        notes.append("rollout skipped: needs self-attention records (as many queries as keys) of one length")
    elif max(sizes) > rollout_max_tokens:
        notes.append(f"rollout skipped: N={max(sizes)} > {rollout_max_tokens=} (it keeps N x N maps per layer)")
    else:
        with torch.no_grad(), capture(model, keep_outputs=False) as full:
            subject.forward(subject.batches[0])
        fm = full.maps()
        seq = [fm[n].double() for n in square]  # first call of each module, in call order
        rollout = {"layers": square, "matrix": _list(M.attention_rollout(seq)[0])}
        N = seq[0].shape[-1]
        if N > flow_max_tokens:
            notes.append(f"attention flow skipped: N={N} > {flow_max_tokens=} (one max-flow per source and target "
                         "token on (layers + 1) N nodes)")
        else:
            try:
                srcs = list(subject.flow_sources) if subject.flow_sources is not None else [N - 1]
                flows = M.attention_flow([a[:1] for a in seq], sources=srcs)  # (1, S, N)
                flow = {"sources": [s % N for s in srcs], "matrix": _list(flows[0])}
            except ImportError as e:
                notes.append(f"attention flow skipped: {e}")

    gaam = {name: {"per_head": _list(v["per_head"])} for name, v in M.gaam_importance(model).items()}

    # clusters of per-head mean maps (batch mean)
    keys = [(name, h) for name, p in maps.items() for h in range(p.shape[1])]
    cluster_info = hc = None
    if len(keys) >= 2:
        pool = torch.nn.functional.adaptive_avg_pool2d
        stack = torch.stack([pool(maps[name][:, h].double().mean(0)[None], 16)[0] for name, h in keys])  # (K, 16, 16)
        hc = cluster_heads(stack, clusters)
        cluster_info = {
            "k": int(hc.labels.max()) + 1,
            "members": [{"layer": n, "head": h, "cluster": int(c)} for (n, h), c in zip(keys, hc.labels)],
            "representatives": [{"layer": keys[i][0], "head": keys[i][1], "cluster": int(hc.labels[i]),
                                 "size": int((hc.labels == hc.labels[i]).sum())} for i in hc.representatives],
            "explained_variance": _list(torch.from_numpy(hc.explained)),
        }

    metrics = {
        "schema_version": 1,
        "model": {"name": subject.name, "class": type(model).__name__,
                  "parameters": sum(p.numel() for p in model.parameters()), "training": dict(subject.training)},
        "task": dict(subject.task),
        "capture": {"max_queries": max_queries, "batches": len(subject.batches),
                    "records": [{"name": r.name, "source": r.source, "heads": r.heads, "n_queries": r.n_queries,
                                 "n_keys": r.n_keys, "pattern": r.pattern} for r in (recs[0] for recs in grouped.values())]},
        "layers": layers,
        "clusters": cluster_info,
        "rollout": rollout,
        "flow": flow,
        "gaam": gaam,
        "figures": [],
        "notes": notes,
    }
    if figures:
        from headwise.analysis import plots

        metrics["figures"] = plots.draw_all(metrics, maps, subject, out, top_heads=top_heads, clusters=hc)
    check(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out / "metrics.schema.json").write_text(json.dumps(METRICS_SCHEMA, indent=1))
    write_html(metrics, out / "report.html")
    return metrics


def _top_heads(metrics: dict, key: str, k: int) -> list[tuple[str, int, float]]:
    rows = [(name, h, v) for name, e in metrics["layers"].items() for h, v in enumerate(e.get(key) or []) if v is not None]
    return sorted(rows, key=lambda r: -r[2])[:k]


def write_html(metrics: dict, path: str | Path) -> Path:
    """One static page: model and task, a table of the top heads, every figure of ``metrics["figures"]``."""
    path = Path(path)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>headwise inspect: {esc(metrics['model']['name'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "figure{display:inline-block;vertical-align:top;margin:1em 1em 1em 0;max-width:100%}"
        "figcaption{max-width:520px;font-size:90%}</style>",
        "</head><body>",
        f"<h1>headwise inspect: {esc(metrics['model']['name'])}</h1>",
        f"<p>{esc(metrics['model']['class'])}, {metrics['model']['parameters']:,} parameters; "
        f"{len(metrics['layers'])} attention layers captured over {metrics['capture']['batches']} batches.</p>",
    ]
    for title, obj in (("Task", metrics["task"]), ("Training", metrics["model"].get("training") or {})):
        if obj:
            items = "".join(f"<li><b>{esc(str(k))}</b>: {esc(str(v))}</li>" for k, v in obj.items())
            parts.append(f"<h2>{title}</h2><ul>{items}</ul>")
    for key, label in (("pruning_importance", "loss increase when pruned"), ("gradient_importance", "E|dL/dg|"),
                       ("divergence", "head divergence")):
        top = _top_heads(metrics, key, 5)
        if top:
            body = "".join(f"<tr><td>{esc(n or '(root)')}</td><td>{h}</td><td>{v:.4g}</td></tr>" for n, h, v in top)
            parts.append(f"<h2>Top heads: {label}</h2><table><tr><th>layer</th><th>head</th><th>{label}</th></tr>"
                         f"{body}</table>")
    sinks = [(n, h, e["sink_tokens"][h]) for n, e in metrics["layers"].items() for h, s in enumerate(e["sink_head"]) if s]
    parts.append(f"<h2>Sink heads</h2><p>{len(sinks)} sink heads"
                 + (": " + ", ".join(f"{esc(n or '(root)')} h{h} -> {t}" for n, h, t in sinks[:20]) if sinks else "")
                 + "</p>")
    for fig in metrics["figures"]:
        parts.append(f'<figure><img src="{esc(fig["file"])}" alt="{esc(fig["title"])}">'
                     f"<figcaption><b>{esc(fig['title'])}</b> {esc(fig.get('caption', ''))}</figcaption></figure>")
    if metrics["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in metrics["notes"]) + "</ul>")
    parts.append('<p>Raw numbers: <a href="metrics.json">metrics.json</a> '
                 '(schema: <a href="metrics.schema.json">metrics.schema.json</a>).</p></body></html>')
    path.write_text("\n".join(parts))
    return path


def referenced_images(html_path: str | Path) -> list[str]:
    """The ``src`` of every ``<img>`` in an HTML file (parsed with :mod:`html.parser`)."""
    from html.parser import HTMLParser

    found: list[str] = []

    class _Images(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                found.append(dict(attrs).get("src", ""))

    _Images().feed(Path(html_path).read_text())
    return found
