"""The context-parallel benchmark: per-rank time, peak memory and communication of ring and head-parallel
attention on ``P`` local CPU processes (gloo) at a fixed total sequence length ``N``.

For each ``P`` in ``ranks`` (default 1, 2, 4) the benchmark spawns ``P`` processes
(:func:`headwise.distributed.run_local`); each rank builds its own random shard of q, k, v (``[B, H, N / P, D]``
fp32, padding included) and times one forward + backward (the gradients of q, k, v for a random output
gradient) of each method:

* ``ring``: :func:`headwise.distributed.ring_attention`;
* ``heads``: :func:`headwise.distributed.head_parallel_attention` (needs ``H % P == 0``);
* ``single`` (``P = 1`` only): :func:`headwise.attention` on the whole sequence, the one-process baseline.

Per rank: ``ms`` (minimum of the timed calls after a warm-up, :func:`headwise.bench.timing.time_call`),
``peak_mib`` (peak extra resident memory of one call, :func:`headwise.bench.timing.peak_memory_mb`: the call's
temporaries, received buffers and gradients; the input shards are allocated before and not counted), and the
payload bytes it sent and received in one call (:func:`headwise.distributed.count_communication`). A row
summarizes the ranks of one ``(method, P)``: the slowest rank's time (a step waits for it), the largest peak,
the largest volume sent, and ``mem_vs_p1`` = peak / peak at ``P = 1`` of the same method (ideal ``1 / P``).

On one machine the ranks share its cores (``threads`` each, default 1): this shows memory and communication
per rank, not a speedup; on a 2-core machine ``P = 4`` is slower than ``P = 1`` by construction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from headwise.console import add_report_arguments, stderr_progress
from headwise.tables import Column, fmt_ms, markdown_table, plain_rich_table, print_report
from headwise.bench.timing import environment, peak_memory_mb, time_call

__all__ = ["run", "summarize", "to_markdown", "to_rich_table", "add_arguments", "main", "METHODS"]

METHODS = ("ring", "heads", "single")
RANKS = (1, 2, 4)


def _rank_worker(rank: int, world: int, cfg: dict) -> list[dict]:
    """One rank: time, memory and communication of each method on this rank's shard."""
    import headwise
    from headwise.distributed import count_communication, head_parallel_attention, ring_attention
    from headwise.distributed.sharding import ShardLayout
    from headwise.patterns import from_spec

    n, B, H, Hkv, D = cfg["n"], cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    pattern = None if cfg["pattern"] == "full" else from_spec(cfg["pattern"], grid=(n,))
    lay = ShardLayout(n, world, cfg["layout"])
    g = torch.Generator().manual_seed(rank)
    rows = []
    for method in cfg["methods"]:
        if method == "single" and world != 1 or method == "heads" and H % world:
            continue
        length = n if method == "single" else lay.local_len
        q, k, v = (torch.randn(B, h, length, D, generator=g).requires_grad_() for h in (H, Hkv, Hkv))
        dout = torch.randn(B, H, length, D, generator=g)
        if method == "single":
            attend = lambda: headwise.attention(q, k, v, pattern)  # noqa: E731
        else:
            fn = ring_attention if method == "ring" else head_parallel_attention
            attend = lambda: fn(q, k, v, pattern, seq_len=n, layout=cfg["layout"])  # noqa: E731

        def step():
            return torch.autograd.grad(attend(), (q, k, v), dout)

        with count_communication() as comm:
            step()  # also the warm-up of plans and kernels before memory is measured
        peak = peak_memory_mb(step)
        t = time_call(step, repeats=cfg["repeats"])
        rows.append(dict(method=method, P=world, rank=rank, N=n, local_len=length, ms=t.min_ms,
                         ms_median=t.median_ms, first_ms=t.first_ms, peak_mib=peak,
                         sent_mib=comm.bytes_sent / 2**20, received_mib=comm.bytes_received / 2**20,
                         messages=comm.messages))
    return rows


def run(*, ranks: Sequence[int] = RANKS, n: int = 4096, batch: int = 1, heads: int = 4, kv_heads: int | None = None,
        head_dim: int = 64, pattern: str = "causal", layout: str = "zigzag", methods: Sequence[str] = METHODS,
        repeats: int = 2, threads: int = 1, timeout: float = 600.0, json_path: str | None = None,
        progress=None) -> list[dict]:
    """Run the benchmark; returns one row per rank and method (module docstring); optionally writes JSON."""
    from headwise.distributed import run_local

    for name, value in (("n", n), ("batch", batch), ("heads", heads), ("head_dim", head_dim), ("repeats", repeats),
                        ("threads", threads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if any(not isinstance(p, int) or p < 1 for p in ranks):
        raise ValueError(f"ranks must be positive ints, got {ranks=!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    cfg = dict(n=n, batch=batch, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, pattern=pattern,
               layout=layout, methods=list(methods), repeats=repeats)
    rows: list[dict] = []
    for world in ranks:
        if progress:
            progress(f"P={world}: spawning {world} process(es)")
        results = run_local(_rank_worker, world, cfg, timeout=timeout, pg_timeout=timeout, threads=threads)
        failed = [r for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"bench distributed: P={world} rank {failed[0].rank} failed: {failed[0].error}\n"
                               f"{failed[0].traceback or ''}")
        rows += [row for r in results for row in r.value]
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = environment("bench distributed") | {"config": cfg, "ranks": list(ranks), "threads_per_rank": threads}
        path.write_text(json.dumps({"header": header, "summary": summarize(rows), "rows": rows}, indent=1))
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per ``(method, P)``: slowest rank's ms, largest peak memory and volume sent, memory vs P = 1."""
    out = []
    keys = sorted({(r["method"], r["P"]) for r in rows}, key=lambda k: (METHODS.index(k[0]), k[1]))
    for method, world in keys:
        rs = [r for r in rows if r["method"] == method and r["P"] == world]
        peaks = [r["peak_mib"] for r in rs if r["peak_mib"] is not None]
        out.append(dict(method=method, P=world, local_len=rs[0]["local_len"], ms=max(r["ms"] for r in rs),
                        peak_mib=max(peaks) if peaks else None, sent_mib=max(r["sent_mib"] for r in rs),
                        messages=max(r["messages"] for r in rs), ideal=1 / world))
    for row in out:
        base = next((b for b in out if b["method"] == row["method"] and b["P"] == 1), None)
        if base is None and row["method"] != "single":
            base = next((b for b in out if b["method"] == "single"), None)
        ok = base is not None and base["peak_mib"] and row["peak_mib"] is not None
        row["mem_vs_p1"] = row["peak_mib"] / base["peak_mib"] if ok else None
    return out


_fmt_opt = lambda f: (lambda x: "-" if x is None else f(x))  # noqa: E731
COLUMNS = (
    Column("method", "method", str),
    Column("P", "P", str),
    Column("local_len", "tokens/rank", str),
    Column("ms", "ms", fmt_ms),
    Column("peak_mib", "peak MiB", _fmt_opt(lambda x: f"{x:.1f}")),
    Column("mem_vs_p1", "vs P=1", _fmt_opt(lambda x: f"{x:.2f}")),
    Column("ideal", "1/P", lambda x: f"{x:.2f}"),
    Column("sent_mib", "sent MiB", lambda x: f"{x:.2f}"),
    Column("messages", "msgs", str),
)
NOTES = ("one fwd+bwd of q, k, v, fp32; ms: the slowest rank (min of the timed calls); the ranks share this "
         "machine's cores, so time shows overhead, not speedup",
         "peak MiB: extra resident memory of one call on the rank that used most (input shards excluded); "
         "vs P=1: against the same method at P=1, ideal 1/P",
         "sent MiB, msgs: payload one rank sent in one call (the most of any rank); msgs counts p2p sends and "
         "collective calls")


def to_markdown(rows: Sequence[dict]) -> str:
    return markdown_table(summarize(rows), COLUMNS, ("method",), NOTES)


def to_rich_table(rows: Sequence[dict], title: str | None = None):
    return plain_rich_table(summarize(rows), COLUMNS, ("method",), title, NOTES)


def add_arguments(parser) -> None:
    """Add ``headwise bench distributed`` options to an :class:`argparse.ArgumentParser`."""
    add_report_arguments(parser)  # --quick: P = 1, 2 at N = 1024
    parser.add_argument("--ranks", help="comma-separated process counts P (default 1,2,4; --quick: 1,2)")
    parser.add_argument("--n", type=int, help="total sequence length N (default 4096; --quick: 1024)")
    parser.add_argument("--heads", type=int, default=4, help="query heads H (default 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default H)")
    parser.add_argument("--head-dim", type=int, default=64, help="head width D (default 64)")
    parser.add_argument("--batch", type=int, default=1, help="batch B (default 1)")
    parser.add_argument("--pattern", default="causal", help='pattern spec, or "full" (default causal)')
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"], help="shard layout")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls after the warm-up (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")


def main(args) -> int:
    """Run from parsed :func:`add_arguments` options; print the table; returns 0."""
    text = args.ranks or ("1,2" if args.quick else "1,2,4")
    try:
        ranks = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--ranks must be comma-separated ints, got {text!r}") from None
    n = args.n or (1024 if args.quick else 4096)
    rows = run(ranks=ranks, n=n, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
               head_dim=args.head_dim, pattern=args.pattern, layout=args.layout, methods=args.methods,
               repeats=args.repeats, threads=args.threads, json_path=args.json,
               progress=None if args.no_progress else stderr_progress)
    title = (f"context parallelism on local gloo processes: N={n}, B={args.batch}, H={args.heads}, "
             f"D={args.head_dim}, pattern {args.pattern}, {args.layout}, {args.threads} thread(s)/rank")
    print_report(to_rich_table(rows, title=title), to_markdown(rows), args.markdown, args.json)
    return 0
