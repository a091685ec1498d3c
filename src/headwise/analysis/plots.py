"""The PNG figures of ``headwise inspect`` (matplotlib, Agg backend), drawn from the metrics dict of
:func:`headwise.analysis.report.inspect_model`. Each function writes one file and returns its figure entry
``{"file", "title", "caption"}``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["draw_all", "metric_heatmaps", "attention_maps", "distance_profiles", "cluster_figure", "rollout_figure"]

_METRICS = (
    ("entropy", "Attention entropy (nats)", "mean over queries and batch; 0 = one key per query"),
    ("mean_distance", "Mean attention distance", "sum_j p_ij d(i, j), in tokens (grid units on an image grid)"),
    ("special_attention", "Attention on special tokens", "mass on the special tokens (e.g. BOS / class token)"),
    ("pruning_importance", "Pruning importance", "loss increase when the head alone is masked"),
    ("gradient_importance", "Gradient importance", "E |d loss / d g_h| of a head gate g = 1"),
    ("divergence", "Head divergence", "|| head output - head output without the segment ||, last token"),
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(name: str) -> str:
    return name or "(root)"


def _panels(n: int, max_cols: int, size: tuple[float, float]):
    """A figure with ``n`` panels in rows of at most ``max_cols`` (unused cells hidden): ``(fig, [ax] * n)``."""
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig, axes = _plt().subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig, out: Path, file: str, title: str, caption: str) -> dict:
    fig.savefig(out / file, dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return {"file": file, "title": title, "caption": caption}


def _layer_head_grid(metrics: dict, key: str) -> tuple[list[str], np.ndarray]:
    """``(layer names, [L, H_max] values)`` of one per-head metric, NaN where missing."""
    names = [n for n, e in metrics["layers"].items() if e.get(key) is not None]
    H = max((metrics["layers"][n]["heads"] for n in names), default=0)
    grid = np.full((len(names), H), np.nan)
    for i, n in enumerate(names):
        vals = metrics["layers"][n][key]
        grid[i, : len(vals)] = [np.nan if v is None else v for v in vals]
    return names, grid


def metric_heatmaps(metrics: dict, out: Path) -> dict | None:
    """One panel per per-head metric: a layers x heads heatmap with the values written in the cells."""
    panels = [(key, title, *_layer_head_grid(metrics, key)) for key, title, _ in _METRICS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    L = max(len(p[2]) for p in panels)
    H = max(p[3].shape[1] for p in panels)
    fig, axes = _panels(len(panels), 2, (2.6 + 0.55 * H, 1.2 + 0.4 * L))
    for ax, (key, title, names, grid) in zip(axes, panels):
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(len(names)), [_label(n) for n in names], fontsize=7)
        ax.set_xlabel("head", fontsize=7)
        for i, j in zip(*np.nonzero(~np.isnan(grid))):
            ax.text(j, i, f"{grid[i, j]:.2g}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(im, ax=ax)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    caption = "; ".join(f"{title}: {caption}" for key, title, caption in _METRICS
                        if any(key == p[0] for p in panels))
    return _save(fig, out, "heatmaps.png", "Per-head metrics (layers x heads)", caption)


def attention_maps(maps: dict[str, Tensor], heads: list[tuple[str, int]], out: Path, title: str, caption: str,
                   file: str) -> dict | None:
    """The attention maps of the chosen ``(layer, head)`` pairs on the first example of the batch."""
    heads = [(n, h) for n, h in heads if n in maps]
    if not heads:
        return None
    fig, axes = _panels(len(heads), 4, (3, 3))
    for ax, (n, h) in zip(axes, heads):
        ax.imshow(maps[n][0, h].float().numpy(), cmap="magma", aspect="auto")
        ax.set_title(f"{_label(n)} h{h}", fontsize=8)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query row", fontsize=7)
    fig.suptitle(title)
    return _save(fig, out, file, title, caption)


def distance_profiles(metrics: dict, out: Path) -> dict | None:
    """Attention mass vs distance: one panel per layer, one line per head (the spatial profile)."""
    names = [n for n, e in metrics["layers"].items() if e.get("distance_profile")]
    if not names:
        return None
    fig, axes = _panels(len(names), 3, (4, 2.8))
    for ax, n in zip(axes, names):
        prof = np.array([[np.nan if v is None else v for v in row] for row in metrics["layers"][n]["distance_profile"]])
        for h, row in enumerate(prof):
            ax.plot(np.arange(len(row)), row, marker=".", label=f"h{h}")
        ax.set_title(_label(n), fontsize=8)
        ax.set_xlabel("distance", fontsize=7)
        ax.set_ylabel("attention mass", fontsize=7)
        ax.legend(fontsize=6)
    title = "Distance profiles"
    return _save(fig, out, "distance_profiles.png", title,
                 "mean attention mass on keys at each (rounded) distance from the query, per layer and head")


def cluster_figure(metrics: dict, clusters: Any, out: Path) -> dict | None:
    """Representative (thumbnail) map of each head cluster, and the heads in PCA coordinates."""
    info = metrics["clusters"]
    if info is None or clusters is None:
        return None
    plt = _plt()
    k = len(info["representatives"])
    fig, axes = plt.subplots(1, k + 1, figsize=(3 * (k + 1), 3), squeeze=False)
    for ax, rep, idx in zip(axes[0], info["representatives"], clusters.representatives):
        ax.imshow(clusters.thumbnails[idx], cmap="magma", aspect="auto")
        ax.set_title(f"cluster {rep['cluster']} ({rep['size']} heads)\n{_label(rep['layer'])} h{rep['head']}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[0][-1]
    xy = clusters.coords[:, :2] if clusters.coords.shape[1] >= 2 else np.c_[clusters.coords[:, 0], np.zeros(len(clusters.coords))]
    ax.scatter(xy[:, 0], xy[:, 1], c=clusters.labels, cmap="tab10")
    ax.set_title("heads in PCA space", fontsize=8)
    title = "Head pattern clusters"
    return _save(fig, out, "clusters.png", title, "PCA + k-means over 16x16 area-averaged attention maps; "
                 "each panel is the member nearest its cluster's centroid")


def rollout_figure(metrics: dict, grid: tuple[int, ...] | None, prefix: int, out: Path) -> dict | None:
    """Attention rollout: the matrix, and over the image grid the row of the first token (class token)."""
    if metrics["rollout"] is None:
        return None
    R = np.array([[np.nan if v is None else v for v in row] for row in metrics["rollout"]["matrix"]])
    plt = _plt()
    N = R.shape[0]
    on_grid = grid is not None and len(grid) == 2 and N == prefix + grid[0] * grid[1]
    fig, axes = plt.subplots(1, 2 if on_grid else 1, figsize=(8 if on_grid else 4, 4), squeeze=False)
    axes[0][0].imshow(R, cmap="magma")
    axes[0][0].set_title("rollout (output token x input token)", fontsize=8)
    if on_grid:  # the class token's row, or without one the mean over output tokens (pooled classifiers)
        row, what = (R[0], "class token 0") if prefix else (R.mean(0), "mean over output tokens")
        axes[0][1].imshow(row[prefix:].reshape(grid), cmap="magma")
        axes[0][1].set_title(f"rollout ({what}) over the {grid[0]}x{grid[1]} grid", fontsize=8)
    title = "Attention rollout"
    return _save(fig, out, "rollout.png", title, "product over layers of head-averaged attention mixed with the "
                 "identity (residual 0.5), batch element 0")


def flow_figure(metrics: dict, out: Path) -> dict | None:
    if metrics["flow"] is None:
        return None
    F = np.array(metrics["flow"]["matrix"], dtype=float)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.2))
    for s, row in zip(metrics["flow"]["sources"], F):
        ax.bar(np.arange(len(row)), row, alpha=0.7, label=f"from output token {s}")
    ax.set_xlabel("input token")
    ax.set_ylabel("max flow")
    ax.legend(fontsize=7)
    title = "Attention flow"
    return _save(fig, out, "flow.png", title, "maximum flow from the output token to each input token through "
                 "the layered attention graph (scipy maximum_flow)")


def draw_all(metrics: dict, maps: dict[str, Tensor], subject: Any, out: Path, *, top_heads: int = 4,
             clusters: Any = None) -> list[dict]:
    """Every figure; returns their entries in page order."""
    figs = [metric_heatmaps(metrics, out)]
    ranked = []
    for key in ("pruning_importance", "gradient_importance", "entropy"):
        ranked = [(n, h) for n, e in metrics["layers"].items() for h, v in enumerate(e.get(key) or []) if v is not None]
        if ranked:
            vals = {(n, h): metrics["layers"][n][key][h] for n, h in ranked}
            ranked.sort(key=lambda nh: -vals[nh] if key != "entropy" else vals[nh])
            break
    figs.append(attention_maps(maps, ranked[:top_heads], out, "Attention maps of the top heads",
                               f"attention on the first example of the {top_heads} heads ranked first by {key.replace('_', ' ')}",
                               "top_heads.png"))
    sink = [(n, h) for n, e in metrics["layers"].items() for h, s in enumerate(e["sink_head"]) if s]
    figs.append(attention_maps(maps, sink[:top_heads], out, "Sink heads",
                               "heads where one key receives at least half of the attention on average", "sink_heads.png"))
    figs.append(distance_profiles(metrics, out))
    figs.append(cluster_figure(metrics, clusters, out))
    figs.append(rollout_figure(metrics, subject.grid, subject.prefix, out))
    figs.append(flow_figure(metrics, out))
    return [f for f in figs if f is not None]
