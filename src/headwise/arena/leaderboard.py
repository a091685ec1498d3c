"""The arena's leaderboard: rows of ``results.json`` aggregated over seeds into a markdown table per task.

One line per (task, variant, steps): the metric's mean and spread over the seeds that finished (``mean ± std``,
sample standard deviation, none for one seed, and ``[min, max]``), the number of seeds, parameters, training
seconds (mean), training tokens per second (mean), peak MB of one training step (mean) and the per-task
breakdown means (e.g. ``acc@16`` for MQAR, the baselines for in-context regression). Variants are ranked by the mean (best first by
the task's direction); failed runs and variants that cannot serve a task follow, the reason in their row.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from headwise.tables import Column, markdown_table

__all__ = ["summarize", "to_markdown", "write_leaderboard"]


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One summary per (task, variant, steps), in the order of first appearance, ranked within each task."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"], r["steps"]), []).append(r)
    out = []
    for (task, variant, steps), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok" and r["value"] is not None]
        values = [r["value"] for r in ok]
        notes = sorted({n for r in rs for n in r.get("notes", ()) if r["status"] != "ok"})
        detail_keys = list(dict.fromkeys(k for r in ok for k in r.get("details", {})))
        out.append({
            "task": task, "variant": variant, "steps": steps, "metric": rs[0]["metric"],
            "higher_is_better": rs[0]["higher_is_better"],
            "status": "ok" if ok else rs[0]["status"], "seeds": len(ok),
            "failed": sum(r["status"] == "failed" for r in rs),
            "mean": _mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None,
            "params": _mean(r["params"] for r in ok) if ok else _mean(r["params"] for r in rs),
            "train_s": _mean(r["train_s"] for r in ok), "tokens_per_s": _mean(r["tokens_per_s"] for r in ok),
            "peak_mb": _mean(r["peak_mb"] for r in ok),
            "details": {k: _mean(r["details"].get(k) for r in ok) for k in detail_keys},
            "curves": [r["curve"] for r in ok],
            "notes": notes,
        })
    for task in dict.fromkeys(s["task"] for s in out):
        ranked = sorted((s for s in out if s["task"] == task and s["mean"] is not None),
                        key=lambda s: -s["mean"] if s["higher_is_better"] else s["mean"])
        for i, s in enumerate(ranked, 1):
            s["rank"] = i
    return out


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 10 else f"{x:.1f}"


def _count(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x:,.0f}"


COLUMNS = (
    Column("rank", "#", str),
    Column("variant", "variant", str),
    Column("score", "metric", str),
    Column("range", "[min, max]", str),
    Column("seeds", "seeds", str),
    Column("params", "params", _count),
    Column("train_s", "train s", lambda x: f"{x:.1f}"),
    Column("tokens_per_s", "tokens/s", lambda x: f"{x:,.0f}"),
    Column("peak_mb", "peak MB", lambda x: f"{x:.1f}"),
    Column("breakdown", "details", str),
)


def _table_row(s: dict) -> dict:
    row = dict(s)
    if s["mean"] is not None:
        row["score"] = _fmt(s["mean"]) + (f" ± {_fmt(s['std'])}" if s["std"] is not None else "")
        row["range"] = f"[{_fmt(s['min'])}, {_fmt(s['max'])}]"
    else:
        row["score"] = s["status"]
    row["seeds"] = (f"{s['seeds']}" + (f" (+{s['failed']} failed)" if s["failed"] else "")) \
        if s["status"] != "unsupported" else None
    row["breakdown"] = ", ".join(f"{k} {_fmt(v)}" for k, v in s["details"].items() if v is not None) or None
    if s["mean"] is None:  # the row says why: the reason it cannot serve the task, or the error
        row["breakdown"] = "; ".join(n.replace("|", "/") for n in s["notes"]) or None
    return row


def to_markdown(rows: Sequence[dict], header: dict | None = None) -> str:
    """The leaderboard of ``rows`` (``results.json`` rows) as markdown: one section per task."""
    summaries = summarize(rows)
    parts = ["# headwise arena leaderboard", ""]
    if header:
        parts += [f"torch {header.get('torch')}, torch threads: {header.get('threads')}, {header.get('cpu')}, "
                  f"load {header.get('load_avg_1min')} at start; started {header.get('started')}.", ""]
    for task in dict.fromkeys(s["task"] for s in summaries):
        mine = [s for s in summaries if s["task"] == task]
        for steps in dict.fromkeys(s["steps"] for s in mine):
            group = [s for s in mine if s["steps"] == steps]
            direction = "higher" if group[0]["higher_is_better"] else "lower"
            ranked = sorted((s for s in group if s["mean"] is not None), key=lambda s: s["rank"])
            rest = [s for s in group if s["mean"] is None]
            parts += [f"## {task}: {group[0]['metric']} ({direction} is better), {steps} steps", "",
                      "metric: mean ± sample std over the seeds that finished.", ""]
            notes = [f"{s['variant']}: {n}" for s in ranked for n in s["notes"]]  # the others say it in the row
            parts.append(markdown_table([_table_row(s) for s in ranked + rest], COLUMNS, ("variant", "breakdown"),
                                        notes))
    return "\n".join(parts)


def write_leaderboard(rows: Sequence[dict], out: str | Path, *, plots: bool = True,
                      header: dict | None = None) -> list[Path]:
    """Write ``OUT/leaderboard.md`` and (``plots``) the PNGs of :mod:`headwise.arena.plots`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "leaderboard.md"
    path.write_text(to_markdown(rows, header))
    written = [path]
    if plots:
        from headwise.arena.plots import write_plots

        written += write_plots(summarize(rows), out / "plots")
    return written
