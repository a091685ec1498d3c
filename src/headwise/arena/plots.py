"""PNG plots of the arena's summaries (:func:`headwise.arena.leaderboard.summarize`), per task:

* ``<task>_metric.png``: the metric of each variant, mean with a bar from min to max over seeds, best first;
* ``<task>_curves.png``: training loss vs step (mean over seeds) of every variant;
* ``<task>_quality_vs_speed.png``: metric vs training tokens per second (log scale), one labelled point per
  variant.

Rendered with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["write_plots"]


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float]]:
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    n = min(len(c) for c in curves)
    steps = [curves[0][i][0] for i in range(n)]
    return steps, [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(summaries: Sequence[dict], folder: str | Path) -> list[Path]:
    """Write the three plots of every task with finished runs into ``folder``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in dict.fromkeys(s["task"] for s in summaries):
        done = [s for s in summaries if s["task"] == task and s["mean"] is not None]
        if not done:
            continue
        done.sort(key=lambda s: s["rank"])
        metric = done[0]["metric"]
        several = len({d["steps"] for d in done}) > 1  # then the labels say which run
        label = [f"{s['variant']} ({s['steps']})" if several else s["variant"] for s in done]

        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(done) + 2), 4.5))
        means = [s["mean"] for s in done]
        err = [[s["mean"] - s["min"] for s in done], [s["max"] - s["mean"] for s in done]]
        ax.bar(range(len(done)), means, yerr=err, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(done)), label, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"{metric} (mean, min-max over seeds)")
        ax.set_title(f"{task}: {metric} by variant ({'higher' if done[0]['higher_is_better'] else 'lower'} is better)")
        written.append(_save(plt, fig, folder / f"{task}_metric.png"))

        fig, ax = plt.subplots(figsize=(8, 5))
        for s, name in zip(done, label):
            steps, loss = _mean_curve(s["curves"])
            if steps:
                ax.plot(steps, loss, label=name, linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title(f"{task}: learning curves")
        ax.legend(fontsize=6, ncol=2)
        written.append(_save(plt, fig, folder / f"{task}_curves.png"))

        fig, ax = plt.subplots(figsize=(7, 5))
        pts = [(s, name) for s, name in zip(done, label) if s["tokens_per_s"]]
        ax.scatter([s["tokens_per_s"] for s, _ in pts], [s["mean"] for s, _ in pts], color="tab:red")
        for s, name in pts:
            ax.annotate(name, (s["tokens_per_s"], s["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens / s")
        ax.set_ylabel(f"{metric} (mean over seeds)")
        ax.set_title(f"{task}: quality vs speed")
        written.append(_save(plt, fig, folder / f"{task}_quality_vs_speed.png"))
    return written
