"""The variants benchmark: parameters, forward time and peak memory of every registered attention module
against ``mha`` at the same shape, measured in one run.

Each row is one module spec at one sequence length ``N`` (fp32, ``x`` of shape ``[batch, N, dim]``, default
``batch=1, dim=512, heads=8``, ``N`` in 1024 and 4096):

* ``params``: trainable parameters (``requires_grad``); ``buffers``: elements of the module's buffers (e.g.
  ``random_features``' frozen query-key matrices), not counted in ``params``.
* ``ms``: forward time under ``torch.no_grad()`` in eval mode, the minimum of ``repeats`` timed calls after one
  warm-up (``ms_median``: their median; ``first_ms``: the warm-up; ``time.perf_counter``). The calls run in
  interleaved rounds, each round timing every variant once, so load from other processes on a shared machine
  falls on all variants alike and the ratios to ``mha`` stay meaningful.
* ``peak_mb``: peak extra resident memory during one more call (:func:`headwise.bench.timing.peak_memory_mb`:
  ``/proc/self/statm`` sampled by a thread, minus the RSS just before the call).
* ``vs_mha``: ``ms / mha's ms`` at the same ``N`` (below 1: faster than MHA); ``params_vs_mha`` likewise.

Every variant in :func:`headwise.available` is built with ``headwise.create(name, dim=dim, heads=heads)`` and
its defaults (without ``heads=`` where its config has no such key, e.g. a single-head design; a note says so),
and fed what it DECLARES it takes (:class:`headwise.variants.base.Capabilities`): ``[B, N, C]`` tokens, or the
``[B, C, h, w]`` feature map of a square ``h x w = N`` grid for the ``"image"`` layout; ``grid=(h, w)`` for
variants with a grid, ``tokens=N`` for those sized for one length. A variant that declares further required
inputs, or that cannot run at ``N`` (:meth:`~headwise.variants.base.Variant.unsupported_length`), gets a row with
``ms = None`` and a note saying why, as does one that cannot be built at the shape or whose forward fails.
MoH adds two rows with half of its routed heads active, ``compute="sparse"`` and ``compute="dense"``. A variant
whose warm-up and timed calls have used ``max_s`` seconds gets no further rounds (a note gives its number of
timed calls). Use :func:`run` from code, ``headwise bench variants`` from the shell.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import headwise
from headwise.console import add_report_arguments, stderr_progress
from headwise.tables import Column, first_line, fmt_ms, markdown_table, plain_rich_table, print_report
from headwise.bench.timing import environment, peak_memory_mb
from headwise.variants.registry import config_fields, get, parse_spec

__all__ = ["run", "default_specs", "build_spec", "measure", "to_markdown", "to_rich_table", "add_arguments", "main"]

LENGTHS = (1024, 4096)
QUICK_LENGTHS = (1024,)
BASELINE = "mha"


def default_specs(heads: int = 8) -> list[str]:
    """``mha`` first, then every other registered variant by name, then the MoH rows with half the routed
    heads active under both compute modes (when ``moh`` is registered)."""
    names = headwise.available()
    specs = [BASELINE] + [n for n in names if n != BASELINE]
    if "moh" in names:
        shared = heads // 2  # MoH's default split: half the heads shared, half routed
        topk = max(1, (heads - shared) // 2)
        specs += [f"moh(shared_heads={shared}, topk={topk}, compute={mode!r})" for mode in ("sparse", "dense")]
    return specs


def _count(tensors) -> int:
    return sum(t.numel() for t in tensors)


def _time_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t0) * 1e3
    del out
    return ms


def build_spec(spec: str, x: torch.Tensor, *, heads: int, seed: int) -> tuple[dict[str, Any], Callable | None]:
    """Build ``spec`` at ``x``'s width and warm it up on ``x`` ``[B, N, C]``: ``(row, forward)``, ``forward``
    None (and a note in the row) when the variant cannot be built or run at this shape."""
    B, N, C = x.shape
    row: dict[str, Any] = {"variant": spec, "n": N, "batch": B, "dim": C, "heads": heads, "params": None,
                           "buffers": None, "ms": None, "ms_median": None, "first_ms": None, "timed_calls": 0,
                           "peak_mb": None, "notes": []}
    torch.manual_seed(seed)
    side = math.isqrt(N)
    grid = (side, side) if side * side == N else None  # the square grid of N tokens, for grid / image variants
    try:
        name, spec_kwargs = parse_spec(spec)
        cls = get(name)
        fields = config_fields(name)
        declared = cls.capabilities
        shape = {key: value for key, value in (("dim", C), ("heads", heads), ("tokens", N)) if key in fields}
        if (declared.grid != "none" or declared.layout == "image") and "grid" in fields:
            if grid is None and (declared.grid == "required" or declared.layout == "image"):
                row["notes"].append(f"skipped: needs a square token grid, N={N} is not one")
                return row, None
            shape["grid"] = grid
        module = headwise.create(spec, **{k: v for k, v in shape.items() if k not in spec_kwargs}).eval()
    except (ValueError, TypeError) as e:
        row["notes"].append(f"skipped: cannot build at dim={C}, heads={heads} ({first_line(e)})")
        return row, None
    if "heads" not in shape:
        row["notes"].append("built without heads= (not one of its config keys)")
    caps = module.caps
    reason = f"forward needs {list(caps.inputs)} besides x" if caps.inputs else module.unsupported_length(N)
    if reason is None and caps.layout == "image":
        if grid is None:
            reason = f"reads a [B, C, h, w] feature map and N={N} is not a square grid"
        else:
            x = x.transpose(1, 2).reshape(B, C, *grid)  # (B, C, h, w): the same tokens as a feature map
    if reason is not None:
        row["notes"].append(f"skipped: {reason}")
        return row, None
    row["params"] = _count(p for p in module.parameters() if p.requires_grad)
    row["buffers"] = _count(module.buffers())

    def forward():
        with torch.no_grad():
            return module(x)

    try:
        t0 = time.perf_counter()
        out = forward()
        row["first_ms"] = (time.perf_counter() - t0) * 1e3
    except Exception as e:  # a variant that cannot run here is a finding to report, not a reason to stop
        row["notes"].append(f"skipped: forward failed at N={N} ({first_line(e)})")
        return row, None
    y = out[0] if caps.output == "tuple" else out
    if caps.mixer and not (isinstance(y, torch.Tensor) and y.shape == x.shape):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        row["notes"].append(f"output is {got}, not the input's {tuple(x.shape)}")
    return row, forward


def measure(entries: Sequence[tuple[dict[str, Any], Callable]], repeats: int, max_s: float | None) -> None:
    """Time every ``(row, forward)`` in interleaved rounds (round ``r`` times each forward once, so load from
    other processes falls on all variants alike), then measure each one's peak memory; fills the rows."""
    samples: list[list[float]] = [[] for _ in entries]
    for _ in range(repeats):
        for (row, forward), times in zip(entries, samples):
            if max_s is not None and times and (row["first_ms"] + sum(times)) / 1e3 >= max_s:
                continue  # this variant's budget is spent
            times.append(_time_ms(forward))
    for (row, forward), times in zip(entries, samples):
        row.update(ms=min(times), ms_median=statistics.median(times), timed_calls=len(times))
        if len(times) < repeats:
            row["notes"].append(f"{len(times)} of {repeats} timed calls (max_s={max_s})")
        row["peak_mb"] = peak_memory_mb(forward)


def _header(*, dim: int, heads: int, batch: int, lengths: Sequence[int], repeats: int, max_s, seed: int) -> dict:
    return {
        **environment("headwise bench variants"),
        "dtype": "float32",
        "dim": dim,
        "heads": heads,
        "batch": batch,
        "lengths": list(lengths),
        "repeats": repeats,
        "max_s": max_s,
        "seed": seed,
        "baseline": BASELINE,
        "timing": "forward in eval mode under torch.no_grad(); one warm-up call each, then `repeats` rounds that "
        "time every variant once (interleaved); min (ms) and median (ms_median), time.perf_counter",
        "memory": "peak_mb: peak RSS (sampled from /proc/self/statm) during one call minus RSS just before it, "
        "after gc and malloc_trim",
    }


def run(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    *,
    dim: int = 512,
    heads: int = 8,
    batch: int = 1,
    lengths: Sequence[int] | None = None,
    repeats: int | None = None,
    max_s: float | None = 60.0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure every registered variant (or the specs in ``names``) against ``mha``; returns the rows.

    ``quick``: ``N = 1024`` only and 2 rounds (default: ``N`` in 1024 and 4096, 5 rounds). ``names``: variant
    names or spec strings (``"moh(compute='dense')"``); ``mha`` is always measured first, as the baseline.
    ``json_path``: also write ``{"header": ..., "rows": ...}`` there. ``progress(message)`` is called before
    each step. ``max_s``: seconds of calls after which a slow variant gets no further rounds.
    """
    for name, value in (("dim", dim), ("heads", heads), ("batch", batch), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    lengths = tuple(lengths) if lengths is not None else (QUICK_LENGTHS if quick else LENGTHS)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive ints, got lengths={lengths!r}")
    repeats = repeats if repeats is not None else (2 if quick else 5)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got repeats={repeats!r}")
    if names is None:
        specs = default_specs(heads)
    else:
        if isinstance(names, str):
            raise TypeError(f"names must be a sequence of variant specs, got the string names={names!r}")
        specs = [BASELINE] + [s for s in names if s != BASELINE]
    header = _header(dim=dim, heads=heads, batch=batch, lengths=lengths, repeats=repeats, max_s=max_s, seed=seed)
    rows: list[dict[str, Any]] = []
    for n in lengths:
        x = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed))  # (B, N, C)
        built = []
        for spec in specs:
            if progress is not None:
                progress(f"build and warm up {spec} at N={n}")
            built.append(build_spec(spec, x, heads=heads, seed=seed))
        if progress is not None:
            progress(f"{repeats} interleaved rounds and peak memory at N={n}")
        measure([(row, fn) for row, fn in built if fn is not None], repeats, max_s)
        base = built[0][0]  # mha
        for row, _ in built:
            row["vs_mha"] = row["ms"] / base["ms"] if row["ms"] is not None and base["ms"] else None
            has_params = row["params"] is not None and base["params"]
            row["params_vs_mha"] = row["params"] / base["params"] if has_params else None
            rows.append(row)
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return rows


# ---- rendering --------------------------------------------------------------------------------------------

COLUMNS = (
    Column("variant", "variant", str),
    Column("n", "N", str),
    Column("params", "params", lambda p: f"{p / 1e6:.2f}M" if p >= 1e5 else f"{p:,}"),
    Column("params_vs_mha", "params/mha", lambda x: f"{x:.2f}"),
    Column("ms", "fwd ms", fmt_ms),
    Column("vs_mha", "ms/mha", lambda x: f"{x:.2f}"),
    Column("peak_mb", "peak MB", lambda x: f"{x:.0f}"),
)


def _notes(rows: Sequence[dict]) -> list[str]:
    return [f"{r['variant']} N={r['n']}: {note}" for r in rows for note in r.get("notes", ())]


def to_markdown(rows: Sequence[dict]) -> str:
    """A GitHub markdown table of the rows, followed by their notes."""
    return markdown_table(rows, COLUMNS, ("variant",), _notes(rows))


def to_rich_table(rows: Sequence[dict], title: str | None = None):
    """The same table as :func:`to_markdown`, as a :class:`rich.table.Table`."""
    return plain_rich_table(rows, COLUMNS, ("variant",), title, _notes(rows))


# ---- command line -----------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """Add ``headwise bench variants`` options to an :class:`argparse.ArgumentParser` (run it with :func:`main`)."""
    add_report_arguments(parser)  # --quick: N = 1024 only, 2 rounds of timed calls
    parser.add_argument("--names", nargs="+", metavar="SPEC",
                        help="variant names or quoted spec strings to run (default: every registered one)")
    parser.add_argument("--lengths", help="comma-separated sequence lengths (default 1024,4096; --quick: 1024)")
    parser.add_argument("--dim", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--heads", type=int, default=8, help="heads (default 8)")
    parser.add_argument("--repeats", type=int, help="rounds of timed calls after the warm-up (default 5; --quick: 2)")


def main(args) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; print the table; returns 0."""
    names = args.names or None
    lengths = [int(s) for s in args.lengths.split(",")] if args.lengths else None
    rows = run(quick=args.quick, json_path=args.json, names=names, dim=args.dim, heads=args.heads,
               lengths=lengths, repeats=args.repeats, progress=None if args.no_progress else stderr_progress)
    title = (f"variants benchmark: forward, fp32, B=1, dim={args.dim}, heads={args.heads}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; min of interleaved timed calls after a warm-up")
    print_report(to_rich_table(rows, title=title), to_markdown(rows), args.markdown, args.json)
    return 0
