"""``headwise demo`` (``make demo``): a short tour that ends in a small report.

1. Three 1-D neighborhood patterns drawn in the terminal: sliding window, dilated, blocked.
2. The block-sparse engine checked against the dense reference (float64) on a 2-D neighborhood.
3. A picture of a 2-D neighborhood mask (``pattern.png``).
4. The quick cases of the pattern benchmark (:data:`headwise.bench.patterns.QUICK_CASES`), timed against
   dense SDPA, written as ``bench.json`` and as the table of ``report.md``.
5. A quick arena run (:data:`ARENA`): ``mha``, single-head ``mha`` and elu+1 ``linear`` attention trained on
   ``mqar`` and ``icl_regression`` (one seed, short presets), written to ``arena/`` (results.json,
   leaderboard.md, plots) and summarized in ``report.md``; ``arena_steps`` scales its steps (0 skips it).

Everything goes to ``<out>/demo-<timestamp>/``; :func:`run_demo` returns the path of ``report.md``.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Sequence

import torch

import headwise
from headwise.bench.patterns import QUICK_CASES, BenchCase, run_pattern_bench, to_rich_table
from headwise.tables import print_table
from headwise.patterns.draw import ascii_mask, build_pattern, describe_pattern, plot_pattern

__all__ = ["run_demo", "add_arguments", "main", "TOUR", "PICTURE", "CHECK", "ARENA"]

# (spec, grid): drawn in the terminal with 4 x 4 tiles
TOUR: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("neighborhood(kernel_size=5)", (16,)),
    ("neighborhood(kernel_size=3, dilation=2)", (16,)),
    ("neighborhood(kernel_size=4, stride=4)", (16,)),
)
PICTURE = ("neighborhood(kernel_size=(5, 5))", (16, 16))  # the PNG of the report
CHECK = ("neighborhood(kernel_size=(5, 7))", (13, 17))  # engine vs reference, float64
# the demo's arena run: variants x tasks, one seed, these task settings (steps scaled by run_demo's arena_steps)
ARENA = {
    "variants": ("mha", "mha(heads=1)", "linear"),
    "tasks": {"mqar": dict(steps=800, pairs=(4, 8), batch=32, eval_examples=400),
              "icl_regression": dict(steps=400, eval_tasks=2000)},
}


def _fresh_dir(root: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = root / f"demo-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"demo-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path


def check_against_reference(spec: str, grid: tuple[int, ...], heads: int = 2, head_dim: int = 16) -> float:
    """Max |blocksparse - reference| of the forward output in float64, on random q, k, v (seed 0)."""
    pattern = build_pattern(spec, grid)
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))  # (B, H, N, D)
    fast = headwise.attention(q, k, v, pattern, backend="blocksparse")
    reference = headwise.attention(q, k, v, pattern, backend="reference")
    return float((fast - reference).abs().max())


def run_demo(out: str | Path = "runs", *, cases: Sequence[BenchCase] | None = None, progress: bool = True,
             arena_steps: float = 1.0) -> Path:
    """Run the tour (module docstring); returns the path of the written ``report.md``. ``arena_steps``: factor on
    the arena run's steps (0: no arena run)."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True, markup=False)
    folder = _fresh_dir(Path(out))
    console.rule("headwise demo")
    console.print("Patterns say which (query, key) pairs attend. Three 1-D neighborhoods of 16 tokens "
                  "(x: attends), with their tile schedules at 4 x 4 tiles:\n")
    for spec, grid in TOUR:
        view = describe_pattern(spec, grid=grid, tile=(4, 4))
        console.print("\n".join(view.summary()))
        console.print(ascii_mask(view.pattern, view.n))
        console.print()

    spec, grid = CHECK
    error = check_against_reference(spec, grid)
    grid_text = "x".join(map(str, grid))
    check_line = (f"block-sparse engine vs dense reference, {spec} on a {grid_text} grid, float64: "
                  f"max abs difference {error:.1e}")
    console.print(check_line)

    spec, grid = PICTURE
    picture = plot_pattern(describe_pattern(spec, grid=grid), folder / "pattern.png")
    console.print(f"drew {spec} on a {'x'.join(map(str, grid))} grid: {picture}\n")

    cases = QUICK_CASES if cases is None else cases
    console.print(f"Timing {len(cases)} quick cases: block-sparse vs dense SDPA on the same q, k, v ...")
    report = run_pattern_bench(cases, progress=progress)
    h = report.header
    print_table(to_rich_table(report.rows, title=f"quick pattern benchmark (ms: min of {h['repeats']} after a warm-up)"),
                console)
    report.write_json(folder / "bench.json")

    text = f"""# headwise demo

{h['started']} · headwise {h['headwise']} · torch {h['torch']} · {h['threads']} threads · {h['cpu']} ({h['machine']}) ·
load average {h['load_avg_1min']} when the benchmark started (a busy machine slows every timing)

## A pattern

![{spec} on a {'x'.join(map(str, grid))} grid](pattern.png)

`{spec}` on a {'x'.join(map(str, grid))} grid: left, the mask (query rows, key columns); right, the keys of
three queries on the grid (the window is shifted, not cropped, at the borders).

## Correctness

{check_line}.

## Quick pattern benchmark

Block-sparse attention (`headwise.attention(..., backend="{h['backend']}")`) against dense full-attention SDPA on
the same q, k, v (fp32, forward, `torch.no_grad()`). `ms`: minimum of {h['repeats']} calls after a warm-up;
`speedup` = dense ms / ms; `ideal` = 1 / density; `efficiency` = speedup / ideal (1.0: time proportional
to the attended pairs); `peak MB`: peak extra resident memory of one call. Raw numbers: `bench.json`.

{report.markdown()}
Full-size cases and peers (compiled FlexAttention, natten, local-attention):
`headwise bench patterns --peers --json runs/bench-patterns.json` (`make bench`).
"""
    if arena_steps:
        text += _demo_arena(folder / "arena", console, arena_steps, progress)
    path = folder / "report.md"
    path.write_text(text)
    return path


def _demo_arena(folder: Path, console, scale: float, progress: bool) -> str:
    """The quick arena run of :data:`ARENA` into ``folder``; returns its section of the report."""
    from headwise.arena import runner
    from headwise.arena.leaderboard import to_markdown

    overrides = {task: {**kw, "steps": max(1, round(kw["steps"] * scale))} for task, kw in ARENA["tasks"].items()}
    console.print(f"\nArena: {', '.join(ARENA['variants'])} on {', '.join(overrides)} (one seed) ...")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and fair on a shared machine
    try:
        rows = runner.run(list(overrides), list(ARENA["variants"]), seeds=1, out=folder, task_overrides=overrides,
                          progress=progress, log=console.print)
    finally:
        torch.set_num_threads(threads)
    board = to_markdown(rows).split("\n", 2)[2]  # without the page title
    return f"""
## Quick arena run

Each variant trained from scratch (AdamW, cosine schedule, one seed) on multi-query associative recall and on
in-context linear regression; raw rows in `arena/results.json`, plots in `arena/plots/`. Full-size runs:
`headwise arena --task mqar,icl_regression --quick --seeds 3 --out runs/arena`.

{board}"""


def add_arguments(parser) -> None:
    """Add ``headwise demo`` options to an :class:`argparse.ArgumentParser` (run it with :func:`main`)."""
    parser.add_argument("--out", default="runs", help="parent folder of the report (default runs/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--arena-steps", type=float, default=1.0,
                        help="factor on the closing arena run's training steps (default 1; 0 skips the arena run)")


def main(args) -> int:
    """Run the tour from parsed :func:`add_arguments` options (``args.case_list``: the benchmark cases)."""
    report = run_demo(args.out, cases=getattr(args, "case_list", None), progress=not args.no_progress,
                      arena_steps=args.arena_steps)
    print(f"wrote {report}")
    return 0
