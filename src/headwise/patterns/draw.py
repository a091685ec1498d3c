"""Describe and draw a pattern: its density and tile schedule (:class:`PatternView`), the mask as text
(:func:`ascii_mask`) or as a picture (:func:`mask_image`, :func:`plot_pattern`), and the catalog of pattern names
(:func:`pattern_catalog`). What ``headwise show-pattern``, ``headwise list`` and the demo print.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import torch

from headwise.console import summary_line
from headwise.patterns.base import Pattern, TileSchedule
from headwise.patterns.spec import PATTERNS, from_spec

__all__ = ["ASCII_MAX_N", "PatternView", "build_pattern", "describe_pattern", "ascii_mask", "mask_image",
           "plot_pattern", "pattern_catalog"]

ASCII_MAX_N = 64  # masks up to this many tokens are drawn in the terminal
_PLOT_MAX_PX = 1024  # larger masks are plotted as the attended fraction of pixel blocks


def build_pattern(spec: str, grid: tuple[int, ...] | None) -> Pattern:
    """A pattern from its spec string; ``grid`` (when given) is passed as a default."""
    return from_spec(spec, grid=grid) if grid is not None else from_spec(spec)


def _count(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


@dataclasses.dataclass(frozen=True)
class PatternView:
    """A pattern at a sequence length, with the numbers ``show-pattern`` prints."""

    spec: str
    pattern: Pattern
    n: int
    head: int | None  # the head shown, for head-specific patterns
    grid: tuple[int, ...] | None
    density: float
    schedule: TileSchedule

    @property
    def tile_counts(self) -> dict[str, int]:
        visited = int(self.schedule.visited.sum())
        full = int((self.schedule.full & self.schedule.visited).sum())
        return {
            "tiles": self.schedule.n_q_tiles * self.schedule.n_kv_tiles,
            "visited": visited,
            "full": full,
            "partial": visited - full,
        }

    def summary(self) -> list[str]:
        n, s = self.n, self.schedule
        counts = self.tile_counts
        where = f"grid {'x'.join(map(str, self.grid))}, " if self.grid else ""
        head = f", head {self.head} of {self.pattern.heads}" if self.head is not None else ""
        attended = round(self.density * n * n)
        computed = s.computed_pairs()
        tq, tk = int(s.q_bounds.diff().max()), int(s.kv_bounds.diff().max())
        lines = [
            f"{self.spec}: {where}N = {n} tokens{head}",
            f"density {self.density:.4f}: {attended:,} of {n * n:,} (query, key) pairs attend",
            f"tile schedule ({_count(s.n_q_tiles, 'query tile')} of <= {tq}, {_count(s.n_kv_tiles, 'key tile')} "
            f"of <= {tk}): {counts['visited']} of {_count(counts['tiles'], 'tile')} visited ({counts['full']} full, "
            f"{counts['partial']} partial)",
            f"computed pairs {computed:,} = {computed / (n * n):.4f} of N^2"
            + (f", {computed / attended:.2f}x the attended pairs" if attended else ""),
        ]
        if s.q_perm is not None or s.kv_perm is not None:
            lines.append("tiles are in a permuted token order (token permutation: compact N-D tiles)")
        return lines


def describe_pattern(
    spec: str,
    *,
    grid: tuple[int, ...] | None = None,
    n: int | None = None,
    head: int | None = None,
    tile: tuple[int, int] = (64, 64),
) -> PatternView:
    """Build ``spec`` (with ``grid`` as default) at ``n`` tokens (default ``prod(grid)``) and its tile schedule."""
    pattern = build_pattern(spec, grid)
    if n is None:
        if grid is None:
            raise ValueError(f"give --grid or --n: the length of {spec!r} is not known")
        n = math.prod(grid)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be a positive int, got {n=!r}")
    pattern.check(n, n)
    if pattern.heads is not None:
        head = 0 if head is None else head
        if not 0 <= head < pattern.heads:
            raise ValueError(f"--head {head} out of range for a pattern with {pattern.heads} heads")
    elif head is not None:
        raise ValueError(f"--head {head} given but {spec!r} is the same for every head")
    schedule = pattern.tile_schedule(n, n, tile[0], tile[1], head=head)
    return PatternView(spec, pattern, n, head, grid, pattern.density(n, n), schedule)


def _mask_rows(pattern: Pattern, n: int, head: int | None, rows: range) -> torch.Tensor:
    q = torch.arange(rows.start, rows.stop, rows.step)[:, None]
    kv = torch.arange(n)[None, :]
    return pattern.mask(q, kv, head).expand(len(rows), n)  # (rows, n)


def ascii_mask(pattern: Pattern, n: int, head: int | None = None) -> str:
    """The mask as text, one row per query: ``x`` attends, ``.`` does not; column numbers on top."""
    if n > ASCII_MAX_N:
        raise ValueError(f"ascii_mask draws at most {ASCII_MAX_N} tokens, got {n=}")
    mask = _mask_rows(pattern, n, head, range(n))  # (n, n)
    width = len(str(n - 1))
    pad = " " * (width + 2)
    lines = []
    if n > 10:
        lines.append(pad + "".join(str(j // 10) if j % 10 == 0 else " " for j in range(n)))
    lines.append(pad + "".join(str(j % 10) for j in range(n)))
    for i in range(n):
        lines.append(f"{i:>{width}}  " + "".join("x" if a else "." for a in mask[i].tolist()))
    return "\n".join(lines)


def mask_image(pattern: Pattern, n: int, head: int | None = None, max_px: int = _PLOT_MAX_PX) -> torch.Tensor:
    """``(P, P)`` float image of the mask. Up to ``max_px`` tokens, the pairs themselves; above, with
    ``f = ceil(n / max_px)``, every ``f``-th query row and, in it, the attended fraction of each block of ``f``
    keys (so drawing a 16k-token mask costs ``n**2 / f`` predicate evaluations, in bounded memory)."""
    f = math.ceil(n / max_px)
    p = math.ceil(n / f)
    image = torch.zeros(p, p)
    rows_per_step = max(1, (1 << 22) // n)
    queries = range(0, n, f)
    for r0 in range(0, len(queries), rows_per_step):
        rows = _mask_rows(pattern, n, head, queries[r0 : r0 + rows_per_step]).float()  # (r, n)
        padded = torch.zeros(rows.shape[0], p * f)
        padded[:, :n] = rows
        image[r0 : r0 + rows.shape[0]] = padded.reshape(rows.shape[0], p, f).mean(-1)  # (r, p)
    return image


def plot_pattern(view: PatternView, path: str | Path) -> Path:
    """PNG of the mask (queries down, keys across); for 2-D grids also the keys of three queries on the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    two_d = view.grid is not None and len(view.grid) == 2 and math.prod(view.grid) == view.n
    fig, axes = plt.subplots(1, 2 if two_d else 1, figsize=(11 if two_d else 6, 5.2), squeeze=False)
    ax = axes[0, 0]
    image = mask_image(view.pattern, view.n, view.head)
    pooled = image.shape[0] < view.n
    vmax = float(image.max()) if pooled and float(image.max()) > 0 else 1.0  # faint blocks stay visible
    ax.imshow(image.numpy(), cmap="Greys", vmin=0, vmax=vmax, interpolation="nearest",
              extent=(0, view.n, view.n, 0))
    ax.set_xlabel("key index")
    ax.set_ylabel("query index")
    f = math.ceil(view.n / image.shape[0])
    blocks = f"\n(every {f}th query; attended fraction of each {f} keys)" if pooled else ""
    ax.set_title(f"mask, density {view.density:.4f}{blocks}", fontsize=10)
    if two_d:
        height, width = view.grid
        picks = {"corner": 0, "edge": (height // 2) * width, "centre": (height // 2) * width + width // 2}
        canvas = torch.zeros(height, width, 4)
        colors = {"corner": (0.85, 0.33, 0.10), "edge": (0.0, 0.45, 0.74), "centre": (0.47, 0.67, 0.19)}
        ax2 = axes[0, 1]
        for label, query in picks.items():
            keys = _mask_rows(view.pattern, view.n, view.head, range(query, query + 1))[0].reshape(height, width)
            canvas[keys] = torch.tensor([*colors[label], 0.55])
            y, x = divmod(query, width)
            ax2.plot(x, y, marker="*", markersize=12, color="black", linestyle="none", clip_on=False)
        ax2.imshow(canvas.numpy(), interpolation="nearest")
        ax2.set_title("keys of three queries (*) on the grid", fontsize=10)
        ax2.set_xlabel(f"x (W = {width})")
        ax2.set_ylabel(f"y (H = {height})")
    fig.suptitle(view.spec + (f" on grid {'x'.join(map(str, view.grid))}" if view.grid else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pattern_catalog() -> list[tuple[str, str, str]]:
    """``(name, signature, first docstring line)`` for every pattern name ``from_spec`` accepts."""
    rows = []
    for name, factory in PATTERNS.items():
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # no signature to show
            arguments = "..."
        else:
            arguments = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        rows.append((name, arguments, summary_line(factory)))
    return rows
