"""The linear-attention benchmark: time per token of Lightning Attention-2 (``chunk_linear_attention``) against
dense causal SDPA and the naive quadratic form, measured in one run.

Each row is one implementation at one sequence length ``N`` and one pass (fp32, ``q, k, v`` of shape
``[B, H, N, D]``, default ``B = 1, H = 8, D = 64``, ``N`` in 1024, 4096, 16384, 65536):

* ``impl``: ``"chunk"`` (:func:`headwise.linear.chunk_linear_attention`, per-head decay, block 64),
  ``"naive"`` (:func:`headwise.linear.naive_linear_attention`, the materialized ``((Q K^T) * M) V``) or
  ``"sdpa_causal"`` (dense causal softmax attention, ``headwise.attention(..., Causal(), backend="sdpa")``).
* ``pass``: ``"fwd"`` (under ``torch.no_grad()``) or ``"fwd+bwd"`` (forward, then backward of a fixed random
  output gradient into ``q, k, v``).
* ``ms``: the minimum of the timed calls after one warm-up (``ms_median``: their median; ``first_ms``: the
  warm-up; ``timed_calls``: how many), via :func:`headwise.bench.timing.time_call`; ``us_per_token = 1000 ms / N``.
  Calls are timed ``repeats`` times, fast ones more (about ``MIN_TIMED_S`` seconds of calls, at most
  ``MAX_CALLS``), in ``rounds`` sweeps over the lengths (the later ones only for calls up to ``ROUND_MAX_MS``):
  the minimum of many short calls spread in time resists the noise of a shared machine.
* ``vs_sdpa``: ``sdpa_causal ms / ms`` at the same ``N`` and pass (above 1: faster than dense causal SDPA).

The quadratic implementations are skipped, with a note saying why, where one call would take over
``max_call_s`` (default 60 s; extrapolated as ``N^2`` from the last length measured) or, for the naive form,
where its ``[B, H, N, N]`` tensors would not fit in half the available memory. :func:`summarize` gives the
papers' two claims as numbers: how flat the chunked op's time per token is across ``N`` (max / min), and its
speedup over causal SDPA. Use :func:`run` from code, ``headwise bench linear`` from the shell.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import headwise
from headwise.console import add_report_arguments, stderr_progress
from headwise.tables import Column, fmt_ms, markdown_table, plain_rich_table, print_report
from headwise.bench.timing import environment, time_call
from headwise.ops.linear import chunk_linear_attention, decay_rates, naive_linear_attention
from headwise.patterns import Causal

__all__ = ["run", "summarize", "to_markdown", "to_rich_table", "add_arguments", "main", "IMPLS", "PASSES"]

LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (1024, 4096)
IMPLS = ("chunk", "naive", "sdpa_causal")
PASSES = ("fwd", "fwd+bwd")
QUADRATIC = ("naive", "sdpa_causal")
# fast calls are repeated until about this much timed work (at most MAX_CALLS calls): the minimum of many short
# calls is what resists the noise of a shared machine
MIN_TIMED_S = 2.0
MAX_CALLS = 200
# later rounds time again only the calls up to this long
ROUND_MAX_MS = 2000.0
# peak memory of the naive form, in [B, H, N, N] fp32 tensors (measured about 3.5 at N = 2048, fwd and fwd+bwd)
NAIVE_SCORE_TENSORS = 4


def _ops(block_size: int, lam: torch.Tensor) -> dict[str, Callable]:
    return {
        "chunk": lambda q, k, v: chunk_linear_attention(q, k, v, lam, block_size=block_size)[0],
        "naive": lambda q, k, v: naive_linear_attention(q, k, v, lam)[0],
        "sdpa_causal": lambda q, k, v: headwise.attention(q, k, v, Causal(), backend="sdpa"),
    }


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _skip_reason(impl: str, n: int, batch: int, heads: int, last: tuple[int, float] | None,
                 max_call_s: float | None) -> str | None:
    """Why a quadratic implementation is not measured at ``n`` (None: measure it)."""
    if impl not in QUADRATIC:
        return None
    if impl == "naive":
        need = NAIVE_SCORE_TENSORS * batch * heads * n * n * 4
        avail = _available_bytes()
        if avail is not None and need > avail / 2:
            return (f"skipped: the naive form holds about {NAIVE_SCORE_TENSORS} [B, H, N, N] fp32 tensors, "
                    f"{need / 2**30:.0f} GiB, over half the {avail / 2**30:.0f} GiB available")
    estimate = _estimate_ms(impl, n, last)
    if estimate is not None and max_call_s is not None and estimate / 1e3 > max_call_s:
        n0, ms0 = last
        return (f"skipped: one call would take about {estimate / 1e3:.0f} s (N^2 from {ms0:.0f} ms at N={n0}), "
                f"over max_call_s={max_call_s:g}")
    return None


def _estimate_ms(impl: str, n: int, last: tuple[int, float] | None) -> float | None:
    """One call's time at ``n``, extrapolated from the last measurement as ``N^2`` (quadratic forms) or ``N``."""
    if last is None:
        return None
    n0, ms0 = last
    return ms0 * (n / n0) ** (2 if impl in QUADRATIC else 1)


def _calls(repeats: int, estimate_ms: float | None) -> int:
    """Timed calls: ``repeats``, or more for fast calls (about ``MIN_TIMED_S`` of them, at most ``MAX_CALLS``)."""
    if estimate_ms is None or estimate_ms <= 0:
        return repeats
    return max(repeats, min(MAX_CALLS, math.ceil(MIN_TIMED_S * 1e3 / estimate_ms)))


def bench_one(op: Callable, q, k, v, grad, pass_: str, repeats: int, max_s: float | None):
    """Time ``op(q, k, v)`` forward (``"fwd"``) or forward and backward (``"fwd+bwd"``)."""
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return op(q, k, v)
    else:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def call():
            for t in leaves:
                t.grad = None
            out = op(*leaves)
            out.backward(grad)
            return out
    return time_call(call, repeats, None, max_s)


def _header(*, batch, heads, head_dim, block_size, lengths, impls, passes, repeats, max_call_s, rounds, seed) -> dict:
    return {
        **environment("headwise bench linear"),
        "dtype": "float32",
        "batch": batch,
        "heads": heads,
        "head_dim": head_dim,
        "block_size": block_size,
        "decay": "headwise.linear.decay_rates(heads) (chunk and naive)",
        "lengths": list(lengths),
        "impls": list(impls),
        "passes": list(passes),
        "repeats": repeats,
        "min_timed_s": MIN_TIMED_S,
        "max_calls": MAX_CALLS,
        "max_call_s": max_call_s,
        "rounds": rounds,
        "round_max_ms": ROUND_MAX_MS,
        "seed": seed,
        "timing": "one warm-up call, then min (ms) and median (ms_median) of the timed calls (at least `repeats`, "
        "more for fast calls: about min_timed_s of them, at most max_calls), time.perf_counter; "
        "fwd under torch.no_grad(), fwd+bwd backpropagates a fixed random output gradient into q, k, v",
    }


def run(
    quick: bool = False,
    json_path: str | os.PathLike | None = None,
    *,
    lengths: Sequence[int] | None = None,
    impls: Sequence[str] = IMPLS,
    passes: Sequence[str] = PASSES,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    block_size: int = 64,
    repeats: int | None = None,
    max_call_s: float | None = 60.0,
    rounds: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure the implementations at each length and pass; returns the rows (fields in the module docstring).

    ``quick``: ``N`` in 1024 and 4096, at least 2 timed calls, one round (default: up to 65536, at least 5 calls,
    2 rounds). ``max_call_s``: skip a quadratic implementation where one call would take longer (None: never skip
    on time). ``rounds``: sweeps over the lengths; after the first, only calls up to ``ROUND_MAX_MS`` are timed
    again, and each row keeps the samples of every round (spreading them in time, away from a burst of other
    work on a shared machine). ``json_path``: also
    write ``{"header": ..., "summary": ..., "rows": ...}`` there. ``progress(message)`` is called before each
    measurement.
    """
    for name, value in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("block_size", block_size),
                        ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    lengths = tuple(lengths) if lengths is not None else (QUICK_LENGTHS if quick else LENGTHS)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive ints, got lengths={lengths!r}")
    for name, chosen, valid in (("impls", impls, IMPLS), ("passes", passes, PASSES)):
        if isinstance(chosen, str) or not chosen or any(c not in valid for c in chosen):
            raise ValueError(f"{name} must be a non-empty sequence of {', '.join(map(repr, valid))}, got {name}={chosen!r}")
    repeats = repeats if repeats is not None else (2 if quick else 5)
    rounds = rounds if rounds is not None else (1 if quick else 2)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got repeats={repeats!r}")
    if max_call_s is not None and not max_call_s > 0:
        raise ValueError(f"max_call_s must be positive or None, got max_call_s={max_call_s!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got rounds={rounds!r}")
    ops = _ops(block_size, decay_rates(heads))
    rows: dict[tuple[str, int, str], dict[str, Any]] = {}
    samples: dict[tuple[str, int, str], list[float]] = {}
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (impl, pass) -> (N, ms) of the latest measurement
    for round_ in range(rounds):
        for n in sorted(lengths):
            g = torch.Generator().manual_seed(seed)
            q, k, v, grad = (torch.randn(batch, heads, n, head_dim, generator=g) for _ in range(4))  # (B, H, N, D)
            for pass_ in passes:
                for impl in sorted(impls, key=lambda i: i != "sdpa_causal"):  # the baseline first
                    key = (impl, n, pass_)
                    if round_ == 0:
                        rows[key] = {"impl": impl, "n": n, "pass": pass_, "batch": batch, "heads": heads,
                                     "head_dim": head_dim, "ms": None, "ms_median": None, "first_ms": None,
                                     "timed_calls": 0, "us_per_token": None, "vs_sdpa": None, "notes": []}
                        reason = _skip_reason(impl, n, batch, heads, last.get((impl, pass_)), max_call_s)
                        if reason is not None:
                            rows[key]["notes"].append(reason)
                            continue
                        estimate = _estimate_ms(impl, n, last.get((impl, pass_)))
                    elif key in samples and min(samples[key]) <= ROUND_MAX_MS:
                        estimate = min(samples[key])
                    else:
                        continue  # skipped, or too slow to time again
                    if progress is not None:
                        progress(f"{impl} {pass_} at N={n}" + (f" (round {round_ + 1})" if round_ else ""))
                    calls = _calls(repeats, estimate)
                    t = bench_one(ops[impl], q, k, v, grad, pass_, calls, max_call_s)
                    if round_ == 0:
                        rows[key]["first_ms"] = t.first_ms
                        last[impl, pass_] = (n, t.min_ms)
                        if len(t.samples_ms) < min(calls, repeats):
                            rows[key]["notes"].append(f"{len(t.samples_ms)} of {repeats} timed calls "
                                                      f"(max_call_s={max_call_s:g})")
                    samples.setdefault(key, []).extend(t.samples_ms)
    for key, row in rows.items():
        if key in samples:
            row.update(ms=min(samples[key]), ms_median=statistics.median(samples[key]),
                       timed_calls=len(samples[key]), us_per_token=min(samples[key]) * 1e3 / key[1])
    for row in rows.values():
        base = rows.get(("sdpa_causal", row["n"], row["pass"]))
        if row["ms"] is not None and base is not None and base["ms"] is not None:
            row["vs_sdpa"] = base["ms"] / row["ms"]
    rows = list(rows.values())
    if json_path is not None:
        header = _header(batch=batch, heads=heads, head_dim=head_dim, block_size=block_size, lengths=lengths,
                         impls=impls, passes=passes, repeats=repeats, max_call_s=max_call_s, rounds=rounds, seed=seed)
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"header": header, "summary": summarize(rows), "rows": rows}, indent=2) + "\n")
    return rows


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Per pass, the chunked op's claims: ``us_per_token`` by ``N``; ``long_vs_short``, its value at the largest
    ``N`` over that at the smallest (the papers' "constant speed" when near 1: above 1, slower per token on long
    sequences); ``flatness``, max / min over every length measured; and ``vs_sdpa`` by ``N``."""
    out: dict[str, dict[str, Any]] = {}
    for pass_ in PASSES:
        chunk = {r["n"]: r for r in rows if r["impl"] == "chunk" and r["pass"] == pass_ and r["ms"] is not None}
        if not chunk:
            continue
        per_token = {n: chunk[n]["us_per_token"] for n in sorted(chunk)}
        out[pass_] = {
            "us_per_token": per_token,
            "long_vs_short": per_token[max(per_token)] / per_token[min(per_token)],
            "flatness": max(per_token.values()) / min(per_token.values()),
            "vs_sdpa": {n: chunk[n]["vs_sdpa"] for n in sorted(chunk) if chunk[n]["vs_sdpa"] is not None},
        }
    return out


# ---- rendering --------------------------------------------------------------------------------------------

COLUMNS = (
    Column("impl", "impl", str),
    Column("n", "N", str),
    Column("pass", "pass", str),
    Column("ms", "ms", fmt_ms),
    Column("us_per_token", "us/token", lambda x: f"{x:.2f}" if x < 100 else f"{x:.0f}"),
    Column("vs_sdpa", "vs sdpa_causal", lambda x: f"{x:.1f}x"),
)


def _notes(rows: Sequence[dict]) -> list[str]:
    return [f"{r['impl']} {r['pass']} N={r['n']}: {note}" for r in rows for note in r.get("notes", ())]


def _summary_lines(rows: Sequence[dict]) -> list[str]:
    lines = []
    for pass_, s in summarize(rows).items():
        ns = list(s["us_per_token"])
        line = (f"chunk {pass_}: {s['us_per_token'][ns[0]]:.2f} us/token at N={ns[0]} .. "
                f"{s['us_per_token'][ns[-1]]:.2f} at N={ns[-1]} (ratio {s['long_vs_short']:.2f}), max/min over all "
                f"lengths {s['flatness']:.2f}")
        if s["vs_sdpa"]:
            line += "; vs sdpa_causal " + ", ".join(f"{x:.1f}x at N={n}" for n, x in s["vs_sdpa"].items())
        lines.append(line)
    return lines


def to_markdown(rows: Sequence[dict]) -> str:
    """A GitHub markdown table of the rows, then the summary and the notes."""
    return markdown_table(rows, COLUMNS, ("impl", "pass"), _summary_lines(rows) + _notes(rows))


def to_rich_table(rows: Sequence[dict], title: str | None = None):
    """The same table as :func:`to_markdown`, as a :class:`rich.table.Table`."""
    return plain_rich_table(rows, COLUMNS, ("impl", "pass"), title, _summary_lines(rows) + _notes(rows))


# ---- command line -----------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """Add ``headwise bench linear`` options to an :class:`argparse.ArgumentParser` (run it with :func:`main`)."""
    add_report_arguments(parser)  # --quick: N in 1024, 4096 only, at least 2 timed calls
    parser.add_argument("--lengths", help="comma-separated sequence lengths (default 1024,4096,16384,65536)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to time")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="passes to time")
    parser.add_argument("--heads", type=int, default=8, help="heads H (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="head width D (default 64)")
    parser.add_argument("--chunk", "--block-size", dest="chunk", type=int, default=64,
                        help="Lightning Attention-2 chunk (block) in tokens (default 64)")
    parser.add_argument("--repeats", type=int, help="timed calls after the warm-up, at least (default 5; --quick: 2)")
    parser.add_argument("--rounds", type=int, help="sweeps over the lengths, keeping every sample (default 2; "
                        "--quick: 1); later rounds time again only calls up to 2 s")
    parser.add_argument("--max-call-s", type=float, default=60.0,
                        help="skip a quadratic implementation where one call would take longer (default 60)")


def main(args) -> int:
    """Run the benchmark from parsed :func:`add_arguments` options; print the table; returns 0."""
    lengths = [int(s) for s in args.lengths.split(",")] if args.lengths else None
    rows = run(quick=args.quick, json_path=args.json, lengths=lengths, impls=args.impls, passes=args.passes,
               heads=args.heads, head_dim=args.head_dim, block_size=args.chunk, repeats=args.repeats,
               max_call_s=args.max_call_s, rounds=args.rounds, progress=None if args.no_progress else stderr_progress)
    title = (f"linear attention benchmark: fp32, B=1, H={args.heads}, D={args.head_dim}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; min of the timed calls after a warm-up")
    print_report(to_rich_table(rows, title=title), to_markdown(rows), args.markdown, args.json)
    return 0
