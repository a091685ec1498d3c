"""``headwise simulate``: tables, JSON and the upper-bound vs measured plot for the simulator.

    headwise simulate SPEC --grid 128,128 [--tile 64] [--json PATH] [--measured runs/bench.json]
    headwise simulate bench [--quick] [--cases a,b] [--measured runs/bench.json] [--plot PATH] [--json PATH]
    headwise simulate decode --params 8e9 --layers 36 --heads 32 --kv-heads 8 --head-dim 128 --context 32768
                             [--batch 1] [--density 0.0625 | --topk 2048] [--block 64]

``bench`` simulates the cases of ``headwise bench patterns`` (or, with ``--measured``, the rows of its JSON, whose
``speedup`` becomes the measured column next to the upper bound, and a PNG plot of both per case).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from headwise.console import console, parse_sizes
from headwise.simulate.kinetics import B200_FLOPS_PER_BYTE, DecodeCost, ModelShape, decode_cost
from headwise.simulate.tiles import PatternSimulation, simulate_pattern

__all__ = ["add_arguments", "main", "simulation_table", "decode_table", "load_measured", "plot_measured",
           "simulate_bench_cases"]

_PATTERN_ONLY = ("grid", "n", "tile_shape", "json_measured", "quick", "cases", "plot")
_DECODE_ONLY = ("params", "layers", "kv_heads", "context", "density", "topk", "block", "bytes", "flops_per_byte")


def add_arguments(p) -> None:
    """The ``simulate`` options (pattern mode and decode mode share ``--heads``, ``--head-dim``, ``--batch``)."""
    p.add_argument("target", metavar="SPEC|bench|decode",
                   help='a pattern spec ("neighborhood(kernel_size=17)"), "bench" (the bench patterns cases) or '
                   '"decode" (the Kinetics decoding cost model)')
    p.add_argument("--batch", type=int, help="B (default 1)")
    p.add_argument("--heads", type=int, help="H, query heads (pattern default 8; decode: required)")
    p.add_argument("--head-dim", type=int, help="D (pattern default 64; decode: required)")
    p.add_argument("--json", help="write the result as JSON here")
    g = p.add_argument_group("pattern options")
    g.add_argument("--grid", help="token grid, e.g. 16384 or 128,128 (passed to the pattern as grid=)")
    g.add_argument("--n", type=int, help="sequence length (default: the product of --grid)")
    from headwise.core.blocksparse import TILE_KV, TILE_Q

    g.add_argument("--tile", default=f"{TILE_Q},{TILE_KV}",
                   help=f"tile size, or query,key tile sizes (default {TILE_Q},{TILE_KV}, the block-sparse engine's)")
    g.add_argument("--tile-shape", help="box of the pattern's own tiles on an N-D grid, e.g. 8,8 (Neighborhood; "
                   "default: its tile_shape(tile))")
    g.add_argument("--quick", action="store_true", help="bench: the quick cases")
    g.add_argument("--cases", help="bench: comma-separated case names")
    g.add_argument("--measured", dest="json_measured", metavar="BENCH_JSON",
                   help="JSON of `headwise bench patterns --json`: adds its measured speedup and plots both")
    g.add_argument("--plot", help="PNG of upper bound vs measured (default: next to --measured, *.simulate.png)")
    g = p.add_argument_group("decode options (Kinetics)")
    g.add_argument("--params", type=float, help="active parameters, e.g. 8e9")
    g.add_argument("--layers", type=int, help="layers")
    g.add_argument("--kv-heads", type=int, help="KV heads (default: --heads)")
    g.add_argument("--context", type=int, help="context length S (cached tokens per sequence)")
    g.add_argument("--density", type=float, help="sparse budget as a fraction of the context")
    g.add_argument("--topk", type=int, help="sparse budget in tokens")
    g.add_argument("--block", type=int, help="block top-k: tokens per block (default: oracle top-k)")
    g.add_argument("--bytes", type=float, help="bytes per cached element (default 2, bf16)")
    g.add_argument("--flops-per-byte", type=float,
                   help=f"arithmetic intensity I (default {B200_FLOPS_PER_BYTE}, B200)")


def _option(name: str) -> str:
    return "--" + {"json_measured": "measured"}.get(name, name).replace("_", "-")


def main(args) -> int:
    """Run ``headwise simulate``; bad input raises ValueError/TypeError (the CLI prints it as one line)."""
    decode = args.target == "decode"
    wrong = [_option(k) for k in (_PATTERN_ONLY if decode else _DECODE_ONLY) if getattr(args, k) is not None
             and getattr(args, k) is not False]
    if wrong:
        mode = "decode" if decode else "pattern"
        raise ValueError(f"{', '.join(wrong)} not used by simulate {'decode' if decode else args.target!r} "
                         f"({mode} mode)")
    out = console()
    if decode:
        result = _decode(args)
        out.print(decode_table(result))
        payload: Any = result.to_json()
    else:
        sims, measured = _patterns(args)
        out.print(simulation_table(sims, measured))
        for sim in sims:
            for note in sim.notes:
                print(f"{sim.case or sim.spec}: {note}")
        payload = {"tool": "headwise simulate", "cases": [s.to_json() | m for s, m in zip(sims, measured)]}
        if args.json_measured:
            plot = args.plot or str(Path(args.json_measured).with_suffix(".simulate.png"))
            print(f"wrote {plot_measured(sims, measured, plot)}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


# ---- patterns -----------------------------------------------------------------------------------------


def _tile(text: str) -> tuple[int, int]:
    tile = parse_sizes(text, "--tile")
    if len(tile) > 2:
        raise ValueError(f"--tile takes one or two sizes (query, key), got {text!r}")
    return tile[0], tile[-1]


def load_measured(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``headwise bench patterns --json`` file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--measured {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--measured {path} is not JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"pattern", "shape", "speedup"} <= r.keys()
                                             for r in rows):
        raise ValueError(f"--measured {path} is not a `headwise bench patterns --json` file (no rows with "
                         "pattern, shape, speedup)")
    return rows


def _measured_fields(row: dict | None) -> dict[str, Any]:
    if row is None:
        return {}
    return {"measured_speedup": row.get("speedup"), "measured_ms": row.get("ms"), "measured_dense_ms":
            row.get("dense_ms")}


def simulate_bench_cases(cases, tile: tuple[int, int]) -> list[PatternSimulation]:
    """Simulate :class:`headwise.bench.patterns.BenchCase` objects at their own ``B, H, D``."""
    return [simulate_pattern(c.pattern, grid=c.grid, batch=c.batch, heads=c.heads, head_dim=c.head_dim,
                             tile=tile, case=c.name) for c in cases]


def _patterns(args) -> tuple[list[PatternSimulation], list[dict[str, Any]]]:
    from headwise.patterns.cases import CASES, QUICK_CASES, BenchCase, select_cases

    tile = _tile(args.tile)
    rows = load_measured(args.json_measured) if args.json_measured else None
    names = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else None
    if args.target == "bench":
        if args.grid or args.n or args.tile_shape:
            raise ValueError("--grid/--n/--tile-shape are set by each case of simulate bench")
        if rows is None:
            cases = select_cases(QUICK_CASES if args.quick else CASES, names)
            return simulate_bench_cases(cases, tile), [{} for _ in cases]
        if names is not None:
            known = [r.get("case") for r in rows]
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(f"--cases {unknown} not in {args.json_measured}; it has: {', '.join(map(str, known))}")
            rows = [r for r in rows if r.get("case") in names]
        cases = [BenchCase(str(r.get("case")), r["pattern"], parse_sizes(str(r["shape"]), "shape"),
                           heads=r.get("heads", 8), head_dim=r.get("head_dim", 64), batch=r.get("batch", 1))
                 for r in rows]
        sims = []
        for case in cases:
            try:
                sims += simulate_bench_cases([case], tile)
            except ValueError as e:
                raise ValueError(f"case {case.name!r} of {args.json_measured}: {e}") from None
        return sims, [_measured_fields(r) for r in rows]
    if args.quick or args.cases:
        raise ValueError("--quick/--cases apply to simulate bench only")
    grid = parse_sizes(args.grid, "--grid") if args.grid else None
    tile_shape = parse_sizes(args.tile_shape, "--tile-shape") if args.tile_shape else None
    sim = simulate_pattern(args.target, grid=grid, n=args.n, batch=args.batch or 1, heads=args.heads or 8,
                           head_dim=args.head_dim or 64, tile=tile, tile_shape=tile_shape)
    measured: dict[str, Any] = {}
    if rows is not None:
        match = [r for r in rows if str(r["shape"]) == "x".join(map(str, sim.grid or (sim.n,)))
                 and r["pattern"] == args.target]
        if not match:
            raise ValueError(f"no row of {args.json_measured} has pattern {args.target!r} on shape "
                             f"{'x'.join(map(str, sim.grid or (sim.n,)))}")
        measured = _measured_fields(match[0])
    return [sim], [measured]


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}" if flops >= 1e8 else f"{flops / 1e9:.3g}"


def _x(v: float | None) -> str:
    return "—" if v is None else "inf" if math.isinf(v) else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def simulation_table(sims: Sequence[PatternSimulation], measured: Sequence[dict] | None = None):
    """Rich table: one row per case, the row-major and the pattern's tiling side by side (and measured)."""
    from rich import box
    from rich.table import Table

    measured = list(measured or [{} for _ in sims])
    show_measured = any(m.get("measured_speedup") is not None for m in measured)
    s0 = sims[0]
    title = "headwise simulate: tile-level work of sparse patterns, forward"
    if len({(s.batch, s.heads, s.head_dim) for s in sims}) == 1:
        title += f", B={s0.batch} H={s0.heads} D={s0.head_dim}"
    caption = ("tile counts summed over the H heads; GFLOP: 4 D per (query, key) pair per head (Q K^T + P V), "
               "softmax not counted; bound = dense GFLOP / tile GFLOP (partial tiles count whole); "
               "ideal = 1 / density; row-major = uniform tiles in token order, pattern = the pattern's own "
               "schedule (token-permuted boxes for N-D grids)")
    if show_measured:
        caption += "; measured / bound uses the pattern bound"
    table = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True,
                  pad_edge=False)
    for column in ["case", "shape", "tile", "density", "dense GFLOP", "ideal",
                  "row-major visited (full)", "row-major GFLOP", "row-major bound",
                  "pattern box", "pattern visited (full)", "pattern GFLOP", "pattern bound"] + (
                      ["measured", "measured / bound"] if show_measured else []):
        table.add_column(column, justify="left" if column in ("case", "shape", "pattern box") else "right",
                         overflow="fold")
    for sim, m in zip(sims, measured):
        own = sim.schedule("pattern")
        names = [s.name for s in sim.schedules]
        rm = sim.schedule("row-major") if "row-major" in names else None
        shape = "x".join(map(str, sim.grid)) if sim.grid else str(sim.n)
        tile = f"{sim.tile[0]}" if sim.tile[0] == sim.tile[1] else f"{sim.tile[0]},{sim.tile[1]}"
        cells = [
            sim.case or sim.spec, shape, tile, f"{sim.density:.4f}", _g(sim.dense_flops), _x(sim.ideal_speedup),
            *([f"{rm.visited:,}/{rm.tiles:,} ({rm.full:,})", _g(rm.tile_flops), _x(rm.upper_bound)] if rm
              else ["—"] * 3),
            ("x".join(map(str, own.tile_shape)) if own.tile_shape else "—") + (" perm" if own.permuted else ""),
            f"{own.visited:,}/{own.tiles:,} ({own.full:,})", _g(own.tile_flops), _x(own.upper_bound),
        ]
        if show_measured:
            got = m.get("measured_speedup")
            cells += [_x(got), "—" if got is None else f"{got / own.upper_bound:.2f}"]
        table.add_row(*cells)
    return table


def plot_measured(sims: Sequence[PatternSimulation], measured: Sequence[dict], path: str | Path) -> Path:
    """PNG: per case, the ideal speedup, the upper bounds of both tilings and the measured speedup (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [f"{s.case or s.spec}\n{'x'.join(map(str, s.grid)) if s.grid else s.n}" for s in sims]
    series = [
        ("ideal (1 / density)", [s.ideal_speedup for s in sims], "0.75"),
        ("upper bound, row-major tiles", [next((x.upper_bound for x in s.schedules if x.name == "row-major"), 0.0)
                                          for s in sims], "tab:orange"),
        ("upper bound, pattern's schedule", [s.schedule("pattern").upper_bound for s in sims], "tab:blue"),
        ("measured", [m.get("measured_speedup") or 0.0 for m in measured], "tab:green"),
    ]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(sims) + 2), 4.8))
    width = 0.8 / len(series)
    for i, (name, values, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(sims))]
        bars = ax.bar(xs, values, width, label=name, color=color)
        ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in values], fontsize=7, padding=1)
    ax.set_yscale("log")
    top = max([v for _, values, _ in series for v in values if v and math.isfinite(v)], default=1.0)
    ax.set_ylim(0.8, top * 6)  # room for the legend above the bars
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(sims)), labels, fontsize=7)
    ax.set_ylabel("speedup over dense (log)")
    ax.set_title("upper-bound (tile-level FLOPs) vs measured speedup")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- decode -------------------------------------------------------------------------------------------


def _decode(args) -> DecodeCost:
    missing = [o for o, v in [("--params", args.params), ("--layers", args.layers), ("--heads", args.heads),
                              ("--head-dim", args.head_dim), ("--context", args.context)] if v is None]
    if missing:
        raise ValueError(f"simulate decode needs {', '.join(missing)}")
    model = ModelShape(params=args.params, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads if args.kv_heads is not None else args.heads, head_dim=args.head_dim)
    return decode_cost(model, context=args.context, batch=args.batch if args.batch is not None else 1,
                       density=args.density, topk=args.topk, block=args.block,
                       bytes_per_element=2.0 if args.bytes is None else args.bytes,
                       flops_per_byte=B200_FLOPS_PER_BYTE if args.flops_per_byte is None else args.flops_per_byte)


def decode_table(c: DecodeCost):
    """Rich table: per generated token, dense vs sparse compute, memory traffic and eFLOPs."""
    from rich import box
    from rich.table import Table

    m = c.model
    table = Table(title=f"Kinetics decoding cost per generated token: P={m.params:.3g}, L={m.layers}, H={m.heads}, "
                  f"H_kv={m.kv_heads}, d={m.head_dim}, context {c.context:,}, batch {c.batch}",
                  caption=f"eFLOPs = FLOPs + I x bytes (KV and selection), I = {c.flops_per_byte:g} FLOPs/byte, "
                  f"{c.bytes_per_element:g} bytes/element; weights traffic is per step (shared by the batch) and "
                  "not in eFLOPs", caption_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("per token")
    table.add_column("dense", justify="right")
    sides = [c.dense] + ([c.sparse] if c.sparse else [])
    if c.sparse:
        table.add_column(c.sparse.kind, justify="right")
        table.add_column("dense / sparse", justify="right")
    b = c.batch

    def row(name: str, values: list[float], fmt, ratio: bool = True) -> None:
        cells = [fmt(v) for v in values]
        if c.sparse:
            cells.append(_x(values[0] / values[1]) if ratio and values[1] else "—")
        table.add_row(name, *cells)

    row("attended tokens", [s.attended for s in sides], lambda v: f"{v:,}")
    row("linear GFLOP", [s.linear_flops / b for s in sides], _g, ratio=False)
    row("attention GFLOP", [s.attention_flops / b for s in sides], _g)
    if c.sparse and c.sparse.selection_flops:
        row("selection GFLOP", [s.selection_flops / b for s in sides], _g, ratio=False)
    row("KV traffic MB", [s.kv_bytes / b / 1e6 for s in sides], lambda v: f"{v:,.1f}")
    if c.sparse and c.sparse.selection_bytes:
        row("selection traffic MB", [s.selection_bytes / b / 1e6 for s in sides], lambda v: f"{v:,.1f}", ratio=False)
    row("weights traffic MB (per step)", [s.weights_bytes / 1e6 for s in sides], lambda v: f"{v:,.0f}", ratio=False)
    row("eFLOPs (G)", [s.eflops_per_token for s in sides], _g)
    row("attention share of eFLOPs", [s.attention_share for s in sides], lambda v: f"{v:.3f}", ratio=False)
    return table
