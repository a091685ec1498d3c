"""The dynamic-selection benchmark: content-aware sparse attention (MoBA, VMoBA, DMA, HiP) against dense SDPA.

One row per :class:`DynamicCase` (fp32, ``B=1, H=8, D=64`` unless the case says otherwise), every number from the
same process and the same random ``q, k, v`` ``[B, H, N, D]`` (normal, seed 0), with the columns of
``headwise bench patterns``:

* ``density``: the realized fraction of (query, key) pairs the selection lets attend, over ``N^2`` (causal and
  block masks included; duplicates counted once); ``ideal_speedup = 1 / density``.
* ``dense_ms``: dense full attention, ``headwise.attention(q, k, v, backend="sdpa")`` with no mask, as in
  ``bench patterns`` (the yardstick: a sparse method's ideal time is ``dense_ms x density``), timed for every
  case right before ours.
* ``ms``: ours, the functional core called the way the module calls it, **selection included**
  (:func:`~headwise.ops.moba.moba_attention`, ``vmoba_attention``, ``hip_attention`` and
  :func:`headwise.variants.dynamic.dma_attention` with its value-derived bias from a seeded ``dma`` module);
  ``select_ms``: the selection alone (gates, top-k / threshold / tree search, conversion to the engine's form).
* ``speedup = dense_ms / ms``; ``efficiency = speedup / ideal_speedup`` (1.0: time proportional to the attended
  pairs at the dense FLOP rate).

Timing: forward under ``torch.no_grad()``; one warm-up call, then the minimum (``ms``) and median
(``ms_median``) of ``repeats`` calls (:func:`headwise.bench.timing.time_call`). The header records the 1-minute
load average before and after the run: on a shared machine, numbers taken under load are slower.

The DMA case needs the ``dma`` variant; without it the case is skipped with a note. Random inputs are a
worst case for content-aware selection's *quality* (nothing to find), not for its speed, which is what is measured.
Use :func:`run` from code, ``headwise bench dynamic`` from the shell.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import headwise
from headwise.bench.patterns import BASE_COLUMNS, add_ratios, select_cases
from headwise.console import add_report_arguments, stderr_progress, user_input
from headwise.tables import Column, fmt_ms, markdown_table, plain_rich_table, print_report
from headwise.bench.timing import environment, time_call
from headwise.ops.selection.blocks import (
    blocks_from_token_selection, hip_select, moba_select, vmoba_partition, vmoba_select,
)
from headwise.ops.hip import hip_attention
from headwise.ops.moba import moba_attention, vmoba_attention

__all__ = ["DynamicCase", "CASES", "QUICK_CASES", "METHODS", "run", "visited_pairs", "to_markdown", "to_rich_table",
           "add_arguments", "main"]


@dataclass(frozen=True)
class DynamicCase:
    """One benchmark case: a method, its settings and the attention shape."""

    name: str  # row label, e.g. "moba-causal"
    method: str  # a key of METHODS: "moba", "vmoba", "dma", "hip"
    grid: tuple[int, ...]  # token grid (N = prod(grid)); VMoBA's (T, H, W)
    params: dict = field(default_factory=dict)  # keywords of the method's functional core
    heads: int = 8  # H
    head_dim: int = 64  # D
    batch: int = 1  # B

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    @property
    def shape(self) -> str:
        return "x".join(map(str, self.grid))

    @property
    def settings(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


# The cases of the issue: MoBA causal N=16384, block 512, top-4; VMoBA on a 16x32x32 video (each partition of its
# layer cycle, 1024-token blocks, global threshold selection tau=0.25); DMA and HiP at N=16384 keeping 1/8 of keys.
CASES: tuple[DynamicCase, ...] = (
    DynamicCase("moba-causal", "moba", (16384,), {"block": 512, "topk": 4}),
    DynamicCase("vmoba-1d", "vmoba", (16, 32, 32), {"partition": "1d", "block": 1, "tau": 0.25}),
    DynamicCase("vmoba-2d", "vmoba", (16, 32, 32), {"partition": "2d", "block": (8, 8), "tau": 0.25}),
    DynamicCase("vmoba-3d", "vmoba", (16, 32, 32), {"partition": "3d", "block": (4, 16, 16), "tau": 0.25}),
    DynamicCase("dma-causal", "dma", (16384,), {"window": 2048}),
    DynamicCase("hip-causal", "hip", (16384,), {"block": 128, "topk": 14, "window": 2}),
)

# The same kinds at 1-2k tokens: seconds, for tests and smoke runs.
QUICK_CASES: tuple[DynamicCase, ...] = (
    DynamicCase("moba-causal", "moba", (2048,), {"block": 128, "topk": 4}),
    DynamicCase("vmoba-1d", "vmoba", (4, 16, 16), {"partition": "1d", "block": 1, "tau": 0.25}),
    DynamicCase("vmoba-2d", "vmoba", (4, 16, 16), {"partition": "2d", "block": (8, 8), "tau": 0.25}),
    DynamicCase("vmoba-3d", "vmoba", (4, 16, 16), {"partition": "3d", "block": (2, 8, 8), "tau": 0.25}),
    DynamicCase("dma-causal", "dma", (2048,), {"window": 256}),
    DynamicCase("hip-causal", "hip", (2048,), {"block": 32, "topk": 6, "window": 2}),
)


# ---- realized density -----------------------------------------------------------------------------------
def visited_pairs(kv_blocks: Tensor, row_mask: Tensor | None, n: int, block: int, causal: bool) -> int:
    """(query, key) pairs a block selection lets attend (self-attention, ``block_q = block_kv = block``), summed
    over batch and heads, without materializing the ``[N, N]`` mask; repeated slots must not occur."""
    B, H, n_qb, S = kv_blocks.shape
    rows = torch.arange(n_qb * block).view(n_qb, 1, block)  # (nQB, 1, bq) query positions
    c = kv_blocks.clamp(min=0)  # (B, H, nQB, S)
    length = (n - c * block).clamp(max=block)[..., None]  # keys in the block
    if causal:
        length = torch.minimum(length, (rows + 1 - c[..., None] * block).clamp(min=0))  # (B, H, nQB, S, bq)
    use = (kv_blocks >= 0)[..., None] & (rows < n)
    if row_mask is not None:
        use = use & row_mask
    return int((length * use).sum())


# ---- the methods ------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    ours: Callable[[], Tensor]  # one forward call, selection included
    select: Callable[[], object]  # the selection alone
    pairs: Callable[[], int]  # attended pairs (all batches and heads)
    note: str | None = None


def _moba(case: DynamicCase, q, k, v) -> _Prepared:
    p = case.params

    def select():  # what moba_attention runs before the engine
        return moba_select(q, k, block=p["block"], topk=p["topk"])

    return _Prepared(lambda: moba_attention(q, k, v, **p), select,
                     lambda: visited_pairs(*blocks_from_token_selection(select(), p["block"]), case.n, p["block"],
                                           causal=p.get("causal", True)))


def _vmoba(case: DynamicCase, q, k, v) -> _Prepared:
    p = case.params
    perm, size = vmoba_partition(case.grid, p["partition"], p["block"])
    choice = {key: p[key] for key in ("selection", "scope", "tau", "topk") if key in p}

    def select():  # what vmoba_attention runs before the engine
        qp, kp = q[:, :, perm], k[:, :, perm]  # block order
        return vmoba_select(qp, kp, block=size, **choice)

    return _Prepared(lambda: vmoba_attention(q, k, v, grid=case.grid, **p), select,
                     lambda: visited_pairs(*blocks_from_token_selection(select(), size), case.n, size, causal=False))


def _hip(case: DynamicCase, q, k, v) -> _Prepared:
    p = case.params

    def select():
        return hip_select(q, k, **p)

    return _Prepared(lambda: hip_attention(q, k, v, **p), select,
                     lambda: visited_pairs(select(), None, case.n, p["block"], causal=p.get("causal", True)))


def _dma(case: DynamicCase, q, k, v) -> _Prepared:
    from headwise.ops.selection.tokens import dma_blocks
    from headwise.ops.dma import dma_attention

    B, H, N, D = q.shape
    w = case.params["window"]
    torch.manual_seed(0)
    module = headwise.create("dma", dim=H * D, heads=H, window=w)  # its dt_proj and A make the bias

    def bias():
        return module.dynamic_bias(v)  # (B, H, N)

    pairs = B * H * sum(min(w, i + 1) for i in range(N))  # causal: query i keeps min(w, i + 1) keys
    return _Prepared(lambda: dma_attention(q, k, v, bias(), w, True), lambda: dma_blocks(bias(), w, module.config.chunk),
                     lambda: pairs, note="bias z = exp(A softplus(v W + b)) of a seeded dma module, included in ms")


# method -> prepare(case, q, k, v): ours (selection included), the selection alone, the attended pairs
METHODS: dict[str, Callable[..., _Prepared]] = {"moba": _moba, "vmoba": _vmoba, "dma": _dma, "hip": _hip}


# ---- the run ----------------------------------------------------------------------------------------------
def bench_case(case: DynamicCase, *, repeats: int = 3, max_s: float | None = 60.0, seed: int = 0) -> dict[str, Any]:
    """Measure one case (fields in the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, case.n, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))  # (B, H, N, D)
    row: dict[str, Any] = {"case": case.name, "method": case.method, "settings": case.settings, "shape": case.shape,
                           "n": case.n, "batch": case.batch, "heads": case.heads, "head_dim": case.head_dim,
                           "notes": []}
    if case.method == "dma" and "dma" not in headwise.available():
        row["notes"].append("skipped: the dma variant is not available")
        return row
    with torch.no_grad():
        if case.method not in METHODS:
            raise ValueError(f"unknown method {case.method!r}; valid: {', '.join(METHODS)}")
        prep = METHODS[case.method](case, q, k, v)
        density = prep.pairs() / (case.batch * case.heads * case.n * case.n)
        row.update(density=density, ideal_speedup=1.0 / density if density > 0 else None)
        # dense measured for every case, right before ours: both see the same load on a shared machine
        t = time_call(lambda: headwise.attention(q, k, v, backend="sdpa"), repeats, None, max_s)
        row.update(dense_ms=t.min_ms, dense_ms_median=t.median_ms)
        t = time_call(prep.ours, repeats, None, max_s)
        row.update(ms=t.min_ms, ms_median=t.median_ms, first_ms=t.first_ms)
        add_ratios(row, "", t.min_ms)
        row["select_ms"] = time_call(prep.select, repeats, None, max_s).min_ms
    if prep.note:
        row["notes"].append(prep.note)
    return row


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def run(quick: bool = False, json_path: str | os.PathLike | None = None, *, cases: Sequence[DynamicCase] | None = None,
        repeats: int | None = None, max_s: float | None = 60.0, seed: int = 0,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"header": ..., "rows": [...]}`` (also written to ``json_path`` when given).

    ``quick``: :data:`QUICK_CASES` and 2 timed calls (default :data:`CASES`, 3 calls).
    """
    cases = list(cases) if cases is not None else list(QUICK_CASES if quick else CASES)
    if not cases:
        raise ValueError("cases is empty: nothing to benchmark")
    repeats = repeats if repeats is not None else (2 if quick else 3)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got repeats={repeats!r}")
    header = {**environment("headwise bench dynamic"), "dtype": "float32", "cases": [c.name for c in cases],
              "repeats": repeats, "seed": seed,
              "timing": "forward under torch.no_grad(); one warm-up call, then min (ms) and median (ms_median) of the "
              "repeats, time.perf_counter; ms includes the selection; select_ms is the selection alone",
              "dense": "headwise.attention(q, k, v, backend='sdpa'), full (unmasked) attention, same q, k, v",
              "density": "attended (query, key) pairs / N^2, causal and block masks included"}
    rows = []
    for case in cases:
        if progress is not None:
            progress(f"{case.name} ({case.method}, N={case.n})")
        rows.append(bench_case(case, repeats=repeats, max_s=max_s, seed=seed))
    header["load_avg_1min_after"] = _load()
    report = {"header": header, "rows": rows}
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- rendering --------------------------------------------------------------------------------------------
_PATTERN_COLUMNS = {c.key: c for c in BASE_COLUMNS}  # the columns of `bench patterns`, by key
COLUMNS = (
    _PATTERN_COLUMNS["case"],
    Column("settings", "settings", str),
    *(_PATTERN_COLUMNS[key] for key in ("shape", "density", "dense_ms", "ms")),
    Column("select_ms", "select ms", fmt_ms),
    *(_PATTERN_COLUMNS[key] for key in ("speedup", "ideal_speedup", "efficiency")),
)
_LEFT = ("case", "settings", "shape")


def _notes(rows: Sequence[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for note in r.get("notes", ()):
            line = f"{r['case']}: {note}"
            if line not in seen:
                seen.append(line)
    return seen


def _conditions(header: dict) -> str:
    before, after = (("n/a" if x is None else f"{x:.1f}") for x in (header["load_avg_1min"],
                                                                     header["load_avg_1min_after"]))
    return (f"fp32, torch {header['torch']}, {header['threads']} threads, {header['cpu']}; 1-minute load average "
            f"{before} before, {after} after; ms: min of {header['repeats']} calls after a warm-up, selection included")


def to_markdown(rows: Sequence[dict], header: dict | None = None) -> str:
    """A GitHub markdown table of the rows, then their notes (and the run's conditions, given its header)."""
    return markdown_table(rows, COLUMNS, _LEFT, _notes(rows) + ([_conditions(header)] if header else []))


def to_rich_table(rows: Sequence[dict], title: str | None = None):
    """The same table as :func:`to_markdown`, as a :class:`rich.table.Table`."""
    return plain_rich_table(rows, COLUMNS, _LEFT, title, _notes(rows))


# ---- command line -----------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """Add ``headwise bench dynamic`` options to an :class:`argparse.ArgumentParser` (run it with :func:`main`)."""
    add_report_arguments(parser)  # --quick: 1-2k tokens instead of 16k
    parser.add_argument("--cases", help="comma-separated case names to run (default: all)")
    parser.add_argument("--repeats", type=int, help="timed calls after the warm-up (default 3; --quick: 2)")


def main(args) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; print the table; returns 0."""
    pool = QUICK_CASES if args.quick else CASES
    names = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else None
    with user_input("--cases"):
        chosen = select_cases(pool, names)
    report = run(cases=chosen, json_path=args.json, repeats=args.repeats, quick=args.quick,
                 progress=None if args.no_progress else stderr_progress)
    h = report["header"]
    title = f"dynamic selection benchmark vs dense SDPA: {_conditions(h)}"
    print_report(to_rich_table(report["rows"], title=title), to_markdown(report["rows"], h), args.markdown,
                 args.json)
    return 0
