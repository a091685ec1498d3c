"""The pattern benchmark: block-sparse attention against dense SDPA and against peer libraries.

One row per :class:`BenchCase` (fp32, ``B=1, H=8, D=64`` unless the case says otherwise), every number from the
same process and the same ``q, k, v``:

* ``density``: the exact fraction of attended pairs (``pattern.density(N, N)``); ``ideal_speedup = 1 / density``.
* ``dense_ms``: dense full attention, ``headwise.attention(q, k, v, backend="sdpa")`` with no pattern.
* ``ms``: ours, ``headwise.attention(q, k, v, pattern, backend="blocksparse")`` (``backend`` is selectable).
* ``speedup = dense_ms / ms``; ``efficiency = speedup / ideal_speedup`` (1.0: time proportional to the
  attended pairs, the limit for a sparse method whose dense counterpart runs at the same FLOP rate).
* ``peak_mb``: peak extra memory of one call of ours (method in :mod:`headwise.bench.timing`).
* with peers, ``<peer>_ms``, ``<peer>_speedup``, ``<peer>_efficiency`` for compiled FlexAttention
  (``flex``), ``natten`` and ``local_attention`` where importable and applicable; a peer that cannot run a
  case leaves ``None`` there and says why in the row's ``notes``. Where the peer computes exactly our
  pattern, ``<peer>_max_diff`` is its largest absolute difference from our output (a sanity check).

Every timing is forward only, under ``torch.no_grad()``: one warm-up call, then the minimum (reported) and
median (``*_ms_median``) of ``repeats`` calls timed with ``time.perf_counter`` (see
:func:`headwise.bench.timing.time_call`). ``first_ms`` is our warm-up call: it includes building and caching
the tile schedule.

FlexAttention (CPU: inference only) runs as ``torch.compile(flex_attention, fullgraph=True)`` with the block
mask from ``create_block_mask(pattern.mask_mod(), ...)`` at its default 128 x 128 blocks: eager when the mask
has at most 2**26 elements, compiled above that (eager evaluation materializes the full mask: about 3 GB at
N = 16384). Mask construction is setup (``flex_setup_ms``), not timed; compilation is in the warm-up call.
Dynamo is reset before each case, the timed calls run with ``fail_on_recompile_limit_hit`` so hitting the
recompile limit raises instead of silently falling back to eager, and a case whose warm-up compiled no graph
is rejected.

Use :func:`run_pattern_bench` from code, ``headwise bench patterns`` from the shell.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

import headwise
from headwise.bench.timing import environment, peak_memory_mb, time_call
from headwise.patterns.cases import (CASES, QUICK_CASES, STRUCTURED_CASES, STRUCTURED_QUICK_CASES, BenchCase,
                                     select_cases)
from headwise.tables import Column, cells, first_line, fmt_ms, markdown_table, row_notes
from headwise.patterns import Neighborhood, Pattern

__all__ = [
    "BenchCase",
    "CASES",
    "QUICK_CASES",
    "STRUCTURED_CASES",
    "STRUCTURED_QUICK_CASES",
    "PEERS",
    "BenchReport",
    "select_cases",
    "run_pattern_bench",
    "to_markdown",
    "to_rich_table",
    "add_arguments",
    "main",
]


# ---- peers ------------------------------------------------------------------------------------------


class PeerSkip(Exception):
    """A peer cannot run this case (not installed, pattern not expressible); the message says why."""


@dataclass
class PeerCall:
    """A prepared peer: ``fn()`` runs one forward call; ``output(fn())`` is ``[B, H, N, D]``."""

    fn: Callable[[], Any]
    setup_ms: float = 0.0  # untimed preparation (block masks, layout changes)
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around the timed calls
    verify: Callable[[], None] | None = None  # after the warm-up: raise if the timing would be invalid
    output: Callable[[Any], Tensor] = lambda out: out
    exact: bool = True  # computes exactly our pattern (then its output is compared with ours)
    note: str | None = None


@dataclass(frozen=True)
class Peer:
    name: str  # as printed, e.g. "local-attention"
    prepare: Callable[[Pattern, Tensor, Tensor, Tensor], PeerCall]  # raises PeerSkip

    @property
    def key(self) -> str:  # row-field prefix, e.g. "local_attention"
        return self.name.replace("-", "_")


_EAGER_MASK_ELEMENTS = 1 << 26


def _prepare_flex(pattern: Pattern, q: Tensor, k: Tensor, v: Tensor) -> PeerCall:
    try:
        import torch._dynamo
        from torch._dynamo.utils import counters
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        raise PeerSkip(f"FlexAttention unavailable in torch {torch.__version__} ({e})") from None
    B, H, N, _ = q.shape
    M = k.shape[2]
    heads = pattern.heads  # None: one mask shared by all heads
    torch._dynamo.reset()  # fresh caches per case: no recompile-limit carry-over between cases
    t0 = time.perf_counter()
    eager = N * M * (heads or 1) <= _EAGER_MASK_ELEMENTS
    make_mask = create_block_mask if eager else torch.compile(create_block_mask)
    block_mask = make_mask(pattern.mask_mod(), None, heads, N, M, device=q.device)
    setup_ms = (time.perf_counter() - t0) * 1e3
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    graphs_before = counters["stats"]["unique_graphs"]

    def verify() -> None:
        if counters["stats"]["unique_graphs"] <= graphs_before:
            raise RuntimeError("flex_attention compiled no graph (it would run eagerly); timing rejected")

    return PeerCall(
        fn=lambda: compiled(q, k, v, block_mask=block_mask),
        setup_ms=setup_ms,
        context=lambda: torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
        verify=verify,
        note=None if eager else "block mask built by compiled create_block_mask",
    )


def _neighborhood_params(pattern: Pattern):
    """``(grid, kernel_size, stride, dilation, causal)`` as per-dimension tuples, or PeerSkip."""
    if not isinstance(pattern, Neighborhood):
        raise PeerSkip(f"runs only Neighborhood patterns, not {type(pattern).__name__}")
    grid = tuple(pattern.grid)

    def per_dim(value):
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(grid)

    return grid, per_dim(pattern.kernel_size), per_dim(pattern.stride), per_dim(pattern.dilation), per_dim(pattern.causal)


def _prepare_natten(pattern: Pattern, q: Tensor, k: Tensor, v: Tensor) -> PeerCall:
    if importlib.util.find_spec("natten") is None:
        raise PeerSkip("not installed (pip install natten)")
    grid, kernel, stride, dilation, causal = _neighborhood_params(pattern)
    import natten

    fn = getattr(natten, f"na{len(grid)}d", None)
    if fn is None:
        import natten.functional

        fn = getattr(natten.functional, f"na{len(grid)}d")
    kwargs: dict[str, Any] = dict(kernel_size=kernel, dilation=dilation, is_causal=causal)
    if "stride" in inspect.signature(fn).parameters:
        kwargs["stride"] = stride
    elif any(s != 1 for s in stride):
        raise PeerSkip(f"natten {getattr(natten, '__version__', '?')} has no stride argument")
    B, H, N, D = q.shape

    def heads_last(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(B, *grid, H, t.shape[-1]).contiguous()  # (B, *grid, H, D)

    t0 = time.perf_counter()
    qn, kn, vn = heads_last(q), heads_last(k), heads_last(v)
    setup_ms = (time.perf_counter() - t0) * 1e3
    return PeerCall(
        fn=lambda: fn(qn, kn, vn, **kwargs),
        setup_ms=setup_ms,
        output=lambda out: out.reshape(B, N, H, -1).transpose(1, 2),  # (B, H, N, D)
    )


def _prepare_local_attention(pattern: Pattern, q: Tensor, k: Tensor, v: Tensor) -> PeerCall:
    if importlib.util.find_spec("local_attention") is None:
        raise PeerSkip("not installed (pip install local-attention)")
    grid, kernel, stride, dilation, causal = _neighborhood_params(pattern)
    if len(grid) != 1 or stride != (1,) or dilation != (1,):
        raise PeerSkip("runs only 1-D windows without stride or dilation")
    from local_attention import LocalAttention

    (k_size,), (is_causal,) = kernel, causal
    common = dict(look_backward=1, exact_windowsize=True, autopad=True, use_rotary_pos_emb=False)
    if is_causal:
        # keys i - (k_size - 1) .. i: exactly the causal neighborhood
        module = LocalAttention(window_size=k_size - 1, causal=True, look_forward=0, **common)
        exact, note = True, None
    else:
        if k_size < 3 or k_size % 2 == 0:
            raise PeerSkip(f"needs an odd kernel_size >= 3 for a symmetric window, got {k_size}")
        # |i - j| <= (k_size - 1) / 2, cropped at the borders where Neighborhood shifts its window
        module = LocalAttention(window_size=(k_size - 1) // 2, causal=False, look_forward=1, **common)
        exact, note = False, "window cropped at the borders (Neighborhood shifts it): same work up to the borders"
    return PeerCall(fn=lambda: module(q, k, v), exact=exact, note=note)


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("flex", _prepare_flex),
        Peer("natten", _prepare_natten),
        Peer("local-attention", _prepare_local_attention),
    )
}


# ---- the run ----------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    """The header (environment, method) and the rows of one benchmark run."""

    header: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"header": self.header, "rows": self.rows}

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def markdown(self) -> str:
        return to_markdown(self.rows)


def bench_header(*, backend: str, device: str, repeats: int, peers: Sequence[str], cases: Sequence[BenchCase]) -> dict:
    """What a reader needs to interpret (and reproduce) the numbers."""
    dev = torch.device(device)
    return {
        **environment("headwise bench patterns"),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "dtype": "float32",
        "backend": backend,
        "peers": list(peers),
        "cases": [c.name for c in cases],
        "repeats": repeats,
        "timing": "forward under torch.no_grad(); one warm-up call, then min (ms) and median (ms_median) of "
        "the repeats, time.perf_counter",
        "memory": "peak_mb: peak RSS (sampled from /proc/self/statm) during one call of ours minus RSS just "
        "before it, after gc and malloc_trim; torch.cuda.max_memory_allocated on GPU",
    }


def add_ratios(row: dict, prefix: str, ms: float | None) -> None:
    dense_ms, density = row["dense_ms"], row["density"]
    speedup = dense_ms / ms if ms else None
    row[f"{prefix}speedup"] = speedup
    row[f"{prefix}efficiency"] = speedup * density if speedup is not None and density > 0 else None


def bench_case(
    case: BenchCase,
    *,
    peers: Sequence[str] = (),
    backend: str = "blocksparse",
    repeats: int = 3,
    device: str = "cpu",
    max_s: float | None = 30.0,
    seed: int = 0,
    step: Callable[[str], None] = lambda what: None,
) -> dict[str, Any]:
    """Measure one case (see the module docstring for the fields); ``step(what)`` reports progress."""
    step("pattern and density")
    pattern = case.build_pattern()
    n = case.n
    pattern.check(n, n)
    density = pattern.density(n, n)
    gen = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.heads, n, case.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device) for _ in range(3))  # (B, H, N, D)
    row: dict[str, Any] = {
        "case": case.name,
        "pattern": case.spec,
        "shape": case.shape,
        "n": n,
        "batch": case.batch,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "density": density,
        "ideal_speedup": 1.0 / density if density > 0 else None,
    }
    notes: list[str] = []

    def ours():
        return headwise.attention(q, k, v, pattern, backend=backend)

    with torch.no_grad():
        step("dense sdpa")
        dense = time_call(lambda: headwise.attention(q, k, v, backend="sdpa"), repeats, device, max_s)
        row.update(dense_ms=dense.min_ms, dense_ms_median=dense.median_ms)
        step(f"ours ({backend})")
        t = time_call(ours, repeats, device, max_s)
        row.update(ms=t.min_ms, ms_median=t.median_ms, first_ms=t.first_ms)
        add_ratios(row, "", t.min_ms)
        row["peak_mb"] = peak_memory_mb(ours, device)
        reference = None
        for name in peers:
            peer = PEERS[name]
            key = peer.key
            step(name)
            row.update({f"{key}_ms": None, f"{key}_speedup": None, f"{key}_efficiency": None})
            try:
                call = peer.prepare(pattern, q, k, v)
                with call.context():
                    pt = time_call(call.fn, repeats, device, max_s)
                    if call.verify is not None:
                        call.verify()
                    out = call.output(call.fn()) if call.exact else None
            except PeerSkip as e:
                notes.append(f"{name}: skipped, {e}")
                continue
            except Exception as e:  # a peer failing is a finding to report, not a reason to stop the run
                notes.append(f"{name}: failed, {first_line(e)}")
                continue
            row.update({f"{key}_ms": pt.min_ms, f"{key}_ms_median": pt.median_ms, f"{key}_first_ms": pt.first_ms,
                        f"{key}_setup_ms": call.setup_ms})
            add_ratios(row, f"{key}_", pt.min_ms)
            if out is not None:
                reference = ours() if reference is None else reference
                row[f"{key}_max_diff"] = float((out.float() - reference.float()).abs().max())
            if call.note:
                notes.append(f"{name}: {call.note}")
    row["notes"] = notes
    return row


def run_pattern_bench(
    cases: Sequence[BenchCase] = CASES,
    *,
    peers: Sequence[str] = (),
    backend: str = "blocksparse",
    repeats: int = 3,
    device: str = "cpu",
    max_s: float | None = 30.0,
    seed: int = 0,
    progress: bool = True,
) -> BenchReport:
    """Run the pattern benchmark over ``cases``; ``peers`` names entries of :data:`PEERS`.

    Shows a rich progress bar on stderr when ``progress`` (hidden when stderr is not a terminal).
    """
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; valid: {', '.join(PEERS)}")
    if not cases:
        raise ValueError("cases is empty: nothing to benchmark")
    from headwise.core.attention import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"unknown {backend=}; valid: {', '.join(BACKENDS)}")
    report = BenchReport(bench_header(backend=backend, device=device, repeats=repeats, peers=peers, cases=cases))
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    steps_per_case = 3 + len(peers)
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not progress) as bar:
        task = bar.add_task("pattern benchmark", total=len(cases) * steps_per_case)
        for i, case in enumerate(cases):
            started = iter(range(steps_per_case))

            def step(what: str, case=case, base=i * steps_per_case, started=started) -> None:
                bar.update(task, description=f"{case.name}: {what}", completed=base + next(started))

            row = bench_case(case, peers=peers, backend=backend, repeats=repeats, device=device, max_s=max_s,
                             seed=seed, step=step)
            bar.update(task, completed=(i + 1) * steps_per_case)
            report.rows.append(row)
    return report


# ---- rendering --------------------------------------------------------------------------------------


BASE_COLUMNS = (
    Column("case", "case", str),
    Column("shape", "shape", str),
    Column("density", "density", lambda x: f"{x:.4f}"),
    Column("dense_ms", "dense ms", fmt_ms),
    Column("ms", "ms", fmt_ms),
    Column("speedup", "speedup", lambda x: f"{x:.1f}x"),
    Column("ideal_speedup", "ideal", lambda x: f"{x:.1f}x"),
    Column("efficiency", "efficiency", lambda x: f"{x:.2f}"),
    Column("peak_mb", "peak MB", lambda x: f"{x:.0f}"),
)


def table_columns(rows: Sequence[dict]) -> list[Column]:
    """The base columns, then ms / speedup / efficiency for each peer that ran in at least one row."""
    columns = list(BASE_COLUMNS)
    for peer in PEERS.values():
        if any(r.get(f"{peer.key}_ms") is not None for r in rows):  # a peer that never ran has only notes
            columns += [
                Column(f"{peer.key}_ms", f"{peer.name} ms", fmt_ms),
                Column(f"{peer.key}_speedup", f"{peer.name} speedup", lambda x: f"{x:.1f}x"),
                Column(f"{peer.key}_efficiency", f"{peer.name} eff.", lambda x: f"{x:.2f}"),
            ]
    return columns


def to_markdown(rows: Sequence[dict]) -> str:
    """A GitHub markdown table of the rows (numbers right-aligned), followed by the rows' notes."""
    return markdown_table(rows, table_columns(rows), left=("case", "shape"), extra=row_notes(rows))


def to_rich_table(rows: Sequence[dict], title: str | None = None):
    """The same table as :func:`to_markdown`, as a :class:`rich.table.Table`."""
    from rich import box
    from rich.table import Table

    columns = table_columns(rows)
    rendered = [cells(r, columns) for r in rows]
    table = Table(title=title, caption="\n".join(row_notes(rows)) or None, caption_justify="left",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for i, c in enumerate(columns):
        # never squeeze a cell: only multi-word titles may wrap (at spaces)
        width = max([len(row[i]) for row in rendered] + [max(len(w) for w in c.title.split())])
        table.add_column(c.title, justify="left" if c.key in ("case", "shape") else "right", min_width=width)
    for row in rendered:
        table.add_row(*row)
    return table


# ---- command line -----------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """Add ``headwise bench patterns`` options to an :class:`argparse.ArgumentParser` (run it with :func:`main`)."""
    from headwise.console import add_report_arguments, positive_int
    from headwise.core.attention import BACKENDS

    add_report_arguments(parser)
    parser.add_argument("--peers", action="store_true", help="also time compiled FlexAttention, natten, local-attention")
    parser.add_argument("--cases", help="comma-separated case names to run (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls after the warm-up (default 3)")
    parser.add_argument("--backend", default="blocksparse", choices=list(BACKENDS), help="our backend (default blocksparse)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def main(args) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; print the table; returns 0.
    ``args.case_list`` (set by ``headwise.cli.main(cases=...)``) replaces the default cases."""
    from headwise.console import user_input
    from headwise.tables import print_report

    default = QUICK_CASES + STRUCTURED_QUICK_CASES if args.quick else CASES + STRUCTURED_CASES
    pool = getattr(args, "case_list", None) or default
    names = [s.strip() for s in args.cases.split(",") if s.strip()] if args.cases else None
    with user_input("--cases"):
        chosen = select_cases(pool, names)
    with user_input("--device"):
        device = str(torch.device(args.device))
    report = run_pattern_bench(chosen, peers=list(PEERS) if args.peers else [], backend=args.backend,
                               repeats=args.repeats, device=device, progress=not args.no_progress)
    h = report.header
    title = (f"pattern benchmark: {h['backend']} vs dense SDPA, fp32, torch {h['torch']}, {h['threads']} threads, "
             f"{h['device']} ({h['gpu'] or h['cpu']}); ms: min of {h['repeats']} after a warm-up")
    if args.json:
        report.write_json(args.json)
    print_report(to_rich_table(report.rows, title=title), report.markdown(), args.markdown, args.json)
    return 0
