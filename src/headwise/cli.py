"""The ``headwise`` command line.

    headwise list                                   registered variants (config fields) and pattern names
    headwise show-pattern SPEC --grid 32,32         density, tile schedule, ASCII mask (N <= 64), --out x.png
    headwise bench patterns [--quick] [--peers]     block-sparse vs dense SDPA (and peers), --json / --markdown
    headwise bench variants [--quick]               every registered variant vs mha (headwise.bench.variants)
    headwise bench linear [--quick]                 chunked linear attention vs causal SDPA (headwise.bench.linear)
    headwise bench distributed [--ranks 1,2,4]      ring / head-parallel attention on P gloo processes (per rank)
    headwise bench dynamic [--quick]                MoBA, VMoBA, DMA, HiP vs dense SDPA (headwise.bench.dynamic)
    headwise simulate SPEC --grid 128,128           attended pairs, tiles, tile-level FLOPs, upper-bound speedup
    headwise simulate decode --params 8e9 ...       Kinetics decoding cost: dense vs sparse attention per token
    headwise moa-plan --task mqar --out plan.json   MoA: profile, MILP plan search, per-head window plan JSON
    headwise inspect --demo --out DIR               what every head does: metrics.json, PNGs, report.html
    headwise arena --task mqar --variants mha,linear --quick --out DIR   train and compare variants; leaderboard
    headwise demo [--out runs]                      a short tour; writes runs/demo-<timestamp>/report.md

``main(argv)`` returns the exit status: 0 on success, 2 for bad input (a one-line message on stderr, no
traceback). ``python -m headwise`` is the same program.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

import headwise
from headwise.patterns.base import Pattern, TileSchedule

__all__ = ["main", "build_parser", "PatternView", "describe_pattern", "ascii_mask", "mask_image", "plot_pattern"]

ASCII_MAX_N = 64  # masks up to this many tokens are drawn in the terminal
_PLOT_MAX_PX = 1024  # larger masks are plotted as the attended fraction of pixel blocks


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


@contextmanager
def _user_input(what: str):
    """Turn a ValueError/TypeError raised while handling user input into a one-line :class:`UsageError`."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise UsageError(f"{what}: {e}") from None


# ---- patterns: build, describe, draw ------------------------------------------------------------------


def parse_sizes(text: str, option: str = "--grid") -> tuple[int, ...]:
    """``"32,32"`` or ``"32x32"`` -> ``(32, 32)``: 1 to 3 positive ints."""
    try:
        sizes = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated positive ints like 32,32, got {text!r}") from None
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise ValueError(f"{option} must have 1 to 3 positive sizes, got {text!r}")
    return sizes


def build_pattern(spec: str, grid: tuple[int, ...] | None) -> Pattern:
    """A pattern from its spec string; ``grid`` (when given) is passed as a default."""
    from headwise.patterns import from_spec

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
    from headwise.patterns import PATTERNS

    rows = []
    for name, factory in PATTERNS.items():
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):  # no signature to show
            arguments = "..."
        else:
            arguments = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        rows.append((name, arguments, _summary_line(factory)))
    return rows


def _summary_line(obj, limit: int = 140) -> str:
    """The first paragraph of ``obj``'s docstring on one line, cut at ``limit`` characters."""
    paragraph = inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0]
    text = " ".join(paragraph.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# ---- commands -----------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # files and pipes: do not squeeze tables into 80 columns
        console = Console(width=max(console.width, 200))
    return console


def cmd_list(args, cases) -> int:
    from rich.table import Table

    from headwise.variants.registry import get

    console = _console()
    variants = Table(title="variants  (headwise.create(\"name(key=value)\", dim=..., heads=...))", title_justify="left")
    variants.add_column("name", no_wrap=True)
    variants.add_column("config")
    variants.add_column("description")
    for name in headwise.available():
        cls = get(name)
        fields = []
        for f in dataclasses.fields(cls.Config):
            has_default = f.default is not dataclasses.MISSING
            fields.append(f"{f.name}={f.default!r}" if has_default else f.name)
        variants.add_row(name, ", ".join(fields), _summary_line(cls))
    console.print(variants)
    patterns = Table(title="patterns  (headwise show-pattern \"name(key=value)\" --grid ...)", title_justify="left")
    patterns.add_column("name", no_wrap=True)
    patterns.add_column("arguments")
    patterns.add_column("description")
    for row in pattern_catalog():
        patterns.add_row(*row)
    console.print(patterns)
    return 0


def cmd_show_pattern(args, cases) -> int:
    from rich.console import Console

    status = Console(stderr=True).status  # a spinner while long masks are evaluated (hidden in pipes)
    with _user_input(f"bad pattern {args.spec!r}"), status("building the pattern and its tile schedule"):
        grid = parse_sizes(args.grid, "--grid") if args.grid else None
        tile = parse_sizes(args.tile, "--tile")
        if len(tile) > 2:
            raise ValueError(f"--tile takes one or two sizes (query, key), got {args.tile!r}")
        view = describe_pattern(args.spec, grid=grid, n=args.n, head=args.head, tile=(tile[0], tile[-1]))
    for line in view.summary():
        print(line)
    if view.n <= ASCII_MAX_N:
        print()
        print(ascii_mask(view.pattern, view.n, view.head))
    elif not args.out:
        print(f"(N > {ASCII_MAX_N}: use --out mask.png to draw it)")
    if args.out:
        try:
            with status(f"drawing {args.out}"):
                path = plot_pattern(view, args.out)
        except OSError as e:
            raise UsageError(f"--out {args.out}: {e.strerror or e}") from None
        print(f"wrote {path}")
    return 0


def _bench_cases(args, cases):
    from headwise.bench.patterns import CASES, QUICK_CASES, STRUCTURED_CASES, STRUCTURED_QUICK_CASES, select_cases

    default = QUICK_CASES + STRUCTURED_QUICK_CASES if args.quick else CASES + STRUCTURED_CASES
    pool = cases if cases is not None else default
    names = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else None
    with _user_input("--cases"):
        return select_cases(pool, names)


def cmd_bench_patterns(args, cases) -> int:
    from rich.console import Console

    from headwise.bench.patterns import PEERS, run_pattern_bench, to_rich_table
    from headwise.tables import print_table

    chosen = _bench_cases(args, cases)
    with _user_input("--device"):
        device = str(torch.device(args.device))
    peers = list(PEERS) if args.peers else []
    report = run_pattern_bench(chosen, peers=peers, backend=args.backend, repeats=args.repeats, device=device,
                               progress=not args.no_progress)
    h = report.header
    title = (f"pattern benchmark: {h['backend']} vs dense SDPA, fp32, torch {h['torch']}, {h['threads']} threads, "
             f"{h['device']} ({h['gpu'] or h['cpu']}); ms: min of {h['repeats']} after a warm-up")
    print_table(to_rich_table(report.rows, title=title), Console())
    if args.json:
        print(f"wrote {report.write_json(args.json)}")
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.markdown())
        print(f"wrote {path}")
    return 0


def cmd_simulate(args, cases) -> int:
    from headwise.simulate import report

    try:
        with _user_input(f"simulate {args.target}"):
            return report.main(args)
    except OSError as e:
        raise UsageError(f"simulate: {e.filename}: {e.strerror or e}") from None


def cmd_demo(args, cases) -> int:
    from headwise.demo import run_demo

    report = run_demo(args.out, cases=cases, progress=not args.no_progress, arena_steps=args.arena_steps)
    print(f"wrote {report}")
    return 0


def cmd_arena(args, cases) -> int:
    from headwise.arena import runner

    with _user_input("arena"):
        return runner.main(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from headwise.core.attention import BACKENDS

    parser = argparse.ArgumentParser(
        prog="headwise",
        description="Multi-head attention variants behind one interface: list them, look at patterns, measure.",
    )
    parser.add_argument("--version", action="version", version=f"headwise {headwise.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="registered variants (with their config fields) and pattern names")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show-pattern", help="density, tile schedule and a picture of a pattern's mask",
                       description="Build a pattern from its spec, print its density and tile-schedule stats, "
                       f"draw the mask as ASCII when N <= {ASCII_MAX_N}, and as a PNG with --out.")
    p.add_argument("spec", help='pattern spec, e.g. "neighborhood(kernel_size=7)" or "causal"')
    p.add_argument("--grid", help="token grid, e.g. 64 or 32,32 or 8,16,16 (passed to the pattern as grid=)")
    p.add_argument("--n", type=int, help="sequence length (default: the product of --grid)")
    p.add_argument("--head", type=int, help="head to show, for head-specific patterns (default 0)")
    p.add_argument("--tile", default="64", help="tile size, or query,key tile sizes (default 64)")
    p.add_argument("--out", help="write the mask as a PNG here")
    p.set_defaults(func=cmd_show_pattern)

    p = sub.add_parser("bench", help="benchmarks (ratios against dense attention and peers)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    p = bench.add_parser("patterns", help="block-sparse attention vs dense SDPA on neighborhood patterns",
                         description="Time headwise.attention on sparse patterns against dense SDPA on the same "
                         "q, k, v (and, with --peers, compiled FlexAttention, natten, local-attention).")
    p.add_argument("--quick", action="store_true", help="smaller shapes (2-4k tokens): seconds, not minutes")
    p.add_argument("--peers", action="store_true", help="also time compiled FlexAttention, natten, local-attention")
    p.add_argument("--cases", help="comma-separated case names to run (default: all)")
    p.add_argument("--json", help="write the header and rows as JSON here")
    p.add_argument("--markdown", help="write the table as markdown here")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed calls after the warm-up (default 3)")
    p.add_argument("--backend", default="blocksparse", choices=list(BACKENDS), help="our backend (default blocksparse)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_patterns)
    from headwise.bench import variants as bench_variants

    p = bench.add_parser("variants", help="every registered variant vs mha: parameters, forward time, memory",
                         description=_summary_line(bench_variants, limit=400))
    bench_variants.add_arguments(p)
    p.set_defaults(func=lambda args, cases: bench_variants.main(args))
    from headwise.bench import linear as bench_linear

    p = bench.add_parser("linear", help="chunked linear attention vs causal SDPA and the naive form: time per token",
                         description=_summary_line(bench_linear, limit=400))
    bench_linear.add_arguments(p)
    p.set_defaults(func=lambda args, cases: bench_linear.main(args))
    from headwise.bench import distributed as bench_distributed

    p = bench.add_parser("distributed", help="ring / head-parallel attention on P local gloo processes: "
                         "per-rank time, memory, communication", description=_summary_line(bench_distributed, limit=400))
    bench_distributed.add_arguments(p)
    p.set_defaults(func=lambda args, cases: bench_distributed.main(args))
    from headwise.bench import dynamic as bench_dynamic

    p = bench.add_parser("dynamic", help="content-aware block selection (MoBA, VMoBA, DMA, HiP) vs dense SDPA",
                         description=_summary_line(bench_dynamic, limit=400))
    bench_dynamic.add_arguments(p)
    p.set_defaults(func=lambda args, cases: bench_dynamic.main(args))

    from headwise.simulate import report as simulate_report

    p = sub.add_parser("simulate", help="upper-bound speedup of a pattern from its tiles; Kinetics decoding cost",
                       description="Exact attended pairs, the tiles a tiled kernel visits (row-major vs the "
                       "pattern's token-permuted schedule), tile-level FLOPs and the upper-bound speedup over dense; "
                       "or, with `decode`, the Kinetics cost model of dense vs sparse decoding.")
    simulate_report.add_arguments(p)
    p.set_defaults(func=cmd_simulate)

    from headwise.moa import cli as moa_cli

    p = sub.add_parser("moa-plan", help="MoA: profile a small LM on a task, search per-head elastic windows, write the plan",
                       description=_summary_line(moa_cli, limit=400))
    moa_cli.add_arguments(p)
    p.set_defaults(func=moa_cli.command)

    from headwise.arena import runner as arena_runner

    p = sub.add_parser("arena", help="train and compare variants on recall, in-context regression, images, text",
                       description=_summary_line(arena_runner, limit=400))
    arena_runner.add_arguments(p)
    p.set_defaults(func=cmd_arena)

    from headwise.analysis import command as inspect_command

    p = sub.add_parser("inspect", help="what every head does: metrics JSON, plots and report.html (--demo: a small trained LM)",
                       description=_summary_line(inspect_command, limit=400))
    inspect_command.add_arguments(p)
    p.set_defaults(func=lambda args, cases: inspect_command.main(args))

    p = sub.add_parser("demo", help="a short tour: patterns, a correctness check, the quick benchmark, a report")
    p.add_argument("--out", default="runs", help="parent folder of the report (default runs/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--arena-steps", type=float, default=1.0,
                   help="factor on the closing arena run's training steps (default 1; 0 skips the arena run)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, *, cases=None) -> int:
    """Run the CLI; returns the exit status. ``cases`` replaces the benchmark's case list (bench and demo)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, cases)
    except UsageError as e:
        print(f"headwise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
