"""Run the arena: train and evaluate every (task, variant, seed), write ``results.json``, the leaderboard and
the plots into one folder, resuming whatever an earlier (interrupted) run left there.

For each task and variant spec, :meth:`headwise.arena.tasks.Task.check` decides whether the variant can serve the
task (a row with ``status="unsupported"`` and the reason when not; no training). Then, seed by seed (so every
variant has a first result before any gets a second), for each served (task, variant):
``torch.manual_seed(seed)``, build the model, :func:`headwise.arena.train.train` with the task's preset
(checkpointed under ``OUT/checkpoints/``), evaluate on the task's held-out set, measure the peak extra memory of
one more training step (:func:`headwise.bench.timing.peak_memory_mb`, forward + backward, no update) and append
the row to ``OUT/results.json`` at once. A row whose ``(task, variant, seed, steps)`` is already in
``results.json`` is not recomputed; an interrupted training resumes from its checkpoint and ends bit-identical
to an uninterrupted one. A run that fails (an exception, a non-finite loss) gets ``status="failed"`` and its
error; the others go on.

Row keys: ``task``, ``variant``, ``seed``, ``metric``, ``value``, ``params``, ``train_s`` (seconds of training
steps), ``tokens_per_s`` (training tokens / ``train_s``; images count their patches), ``peak_mb``, and
``higher_is_better``, ``status``, ``steps``, ``eval_s``, ``details`` (per-task breakdown, e.g. ``acc@16``),
``curve`` (``[step, mean loss]`` pairs, about 50), ``notes``.

Data parallel: under ``torchrun --nproc_per_node P -m headwise arena ...`` every rank trains on its ``1 / P`` slice
of each batch of a DDP model (:func:`headwise.arena.data_parallel_train`; the task's batch must divide by
``P``), which gives the parameters of single-process training on the whole batch; rank 0 alone writes the
checkpoints, ``results.json``, the leaderboard and the plots, and a rerun resumes from them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import headwise
from headwise.arena.models import count_params, split_specs
from headwise.arena.tasks import Task, get_task
from headwise.arena.train import data_parallel_train
from headwise.parallel.data import init_from_env
from headwise.tables import first_line
from headwise.bench.timing import environment, peak_memory_mb

__all__ = ["run", "run_one", "merge", "slug", "load_results", "default_variants", "parse_overrides", "add_arguments",
           "main",
           "CURVE_POINTS"]

CURVE_POINTS = 50


def slug(spec: str) -> str:
    """A file-name-safe, collision-free name for a variant spec."""
    short = re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec).strip("_")[:60]
    return f"{short}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def default_variants() -> list[str]:
    """Every registered variant by name, ``mha`` first."""
    names = headwise.available()
    return ["mha"] + [n for n in names if n != "mha"]


def load_results(out: str | Path) -> dict[str, Any]:
    """``{"header": ..., "rows": [...]}`` from ``OUT/results.json`` (empty rows when absent)."""
    path = Path(out) / "results.json"
    if not path.exists():
        return {"header": {}, "rows": []}
    return json.loads(path.read_text())


def merge(out: str | Path, sources: Sequence[str], *, plots: bool = True) -> list[dict]:
    """Combine the rows of several arena folders (e.g. one process per task on a small machine) into ``out``:
    ``results.json``, the leaderboard and the plots. A source is ``DIR`` or ``DIR:task[+task]`` (only those
    tasks' rows); a later source's row replaces an earlier one for the same (task, variant, seed, steps). The
    header is the first source's, with every source's task presets. Returns the rows."""
    from headwise.arena.leaderboard import write_leaderboard

    if not sources:
        raise ValueError("merge needs at least one source folder, got sources=[]")
    by_key: dict[tuple, dict] = {}
    header: dict = {}
    for source in sources:
        folder, _, only = str(source).partition(":")
        if not (Path(folder) / "results.json").exists():
            raise ValueError(f"source {source!r}: no results.json in {folder!r}")
        tasks = set(only.split("+")) if only else None
        found = load_results(folder)
        for row in found["rows"]:
            if tasks is None or row["task"] in tasks:
                by_key[(row["task"], row["variant"], row["seed"], row["steps"])] = row
        mine = {t: d for t, d in found["header"].get("tasks", {}).items() if tasks is None or t in tasks}
        header = {**(header or found["header"]), "tasks": {**header.get("tasks", {}), **mine}}
    rows = list(by_key.values())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out, {**header, "merged_from": [str(s) for s in sources]}, rows)
    write_leaderboard(rows, out, plots=plots, header=header)
    return rows


def _write(out: Path, header: dict, rows: list[dict]) -> None:
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    tmp.replace(path)


def _curve(losses: Sequence[float], points: int = CURVE_POINTS) -> list[list[float]]:
    if not losses:
        return []
    size = max(1, len(losses) // points)
    return [[i + size, sum(losses[i:i + size]) / len(losses[i:i + size])] for i in range(0, len(losses), size)]


def _base_row(task: Task, spec: str, seed) -> dict:
    return {"task": task.name, "variant": spec, "seed": seed, "metric": task.metric, "value": None, "params": None,
            "train_s": None, "tokens_per_s": None, "peak_mb": None, "higher_is_better": task.higher_is_better,
            "status": "ok", "steps": task.config.steps, "eval_s": None, "details": {}, "curve": [], "notes": []}


def run_one(task: Task, spec: str, seed: int, *, checkpoint: str | Path | None = None, progress: bool = False,
            measure_memory: bool = True, max_train_s: float | None = None) -> dict:
    """Train and evaluate one (task, variant, seed); returns its row (``status="failed"`` with the error when it
    fails). Call :meth:`Task.check` first: an unsupported variant raises here."""
    row = _base_row(task, spec, seed)
    c = task.config
    try:
        torch.manual_seed(seed)
        model = task.build(spec)
        row["params"] = count_params(model)
        result = data_parallel_train(model, lambda step: task.batch(step, seed), task.loss, steps=c.steps, lr=c.lr,
                       weight_decay=c.weight_decay, warmup=task.warmup, seed=seed, checkpoint=checkpoint,
                       checkpoint_every=max(1, min(200, c.steps // 5)), items_fn=task.items,
                       progress=f"{task.name} {spec} seed {seed}" if progress else False, max_seconds=max_train_s)
        row.update(train_s=result.train_s, tokens_per_s=result.items_per_s, curve=_curve(result.losses))
        if result.resumed_from:
            row["notes"].append(f"resumed from step {result.resumed_from}")
        t0 = time.perf_counter()
        value, details = task.evaluate(model)
        row.update(value=value, details=details, eval_s=time.perf_counter() - t0)
        if measure_memory:
            model.train()
            batch = task.batch(0, seed)

            def step():
                loss = task.loss(model, batch)
                loss.backward()
                return loss

            row["peak_mb"] = peak_memory_mb(step)
            model.zero_grad(set_to_none=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # one variant's failure is a result to report, not a reason to stop the others
        row.update(status="failed", value=None)
        row["notes"].append(f"failed: {first_line(e)}")
    return row


def run(
    tasks: Sequence[str],
    variants: Sequence[str] | str | None = None,
    *,
    seeds: int | Sequence[int] = 3,
    quick: bool = False,
    steps: int | None = None,
    out: str | Path,
    task_overrides: dict[str, dict] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    plots: bool = True,
    max_train_s: float | None = None,
) -> list[dict]:
    """Run ``tasks`` x ``variants`` (specs, or one comma-separated string; default every registered variant) x
    ``seeds`` (a count: ``0 .. n-1``, or the seeds) into the folder ``out`` (module docstring); ``steps``
    overrides every task's training steps, ``task_overrides`` ``{task: {config field: value}}`` anything else.
    Writes ``results.json``, ``leaderboard.md`` and the plots; returns all rows of ``results.json``.
    ``max_train_s``: a run whose training takes longer stops there with ``status="failed"`` and a note (its
    checkpoint stays: rerunning with a larger budget resumes it), so one slow variant cannot stall a board."""
    from headwise.arena.leaderboard import write_leaderboard

    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if variants is None:
        variants = default_variants()
    elif isinstance(variants, str):
        variants = split_specs(variants)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a positive count or non-negative ints, got {seeds=}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps=}")
    main_rank = _main_rank()  # under torchrun every rank trains its slice of each batch; rank 0 writes
    log = log or (lambda m: print(m, file=sys.stderr, flush=True) if main_rank else None)
    write = _write if main_rank else (lambda *a: None)
    overrides = task_overrides or {}
    stray = sorted(set(overrides) - set(tasks))
    if stray:
        raise ValueError(f"task_overrides name task(s) {stray} that are not run; tasks: {list(tasks)}")
    task_objs = [get_task(t, quick=quick, **{**overrides.get(t, {}), **({"steps": steps} if steps else {})})
                 for t in tasks]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = load_results(out)["rows"]
    header = {**environment("headwise arena"), "quick": quick, "seeds": seeds,
              "tasks": {t.name: t.describe() for t in task_objs}}
    rows = list(previous)
    done = {(r["task"], r["variant"], r["seed"], r["steps"]) for r in rows if r["status"] in ("ok", "unsupported")}
    served = []  # (task, spec) pairs to train, after one support check each
    for task in task_objs:
        for spec in variants:
            if (task.name, spec, None, task.config.steps) in done:
                continue
            reason = task.check(spec)
            if reason is None:
                served.append((task, spec))
                continue
            row = _base_row(task, spec, None)
            row.update(status="unsupported", notes=[reason])
            rows.append(row)
            write(out, header, rows)
            log(f"{task.name} {spec}: unsupported ({reason})")
    for seed in seeds:  # seed-major: every variant has a first result before any gets its second
        for task, spec in served:
            key = (task.name, spec, seed, task.config.steps)
            if key in done:
                continue
            ckpt = out / "checkpoints" / task.name / f"{slug(spec)}-seed{seed}-steps{task.config.steps}.pt"
            row = run_one(task, spec, seed, checkpoint=ckpt, progress=progress, max_train_s=max_train_s)
            rows = [r for r in rows if (r["task"], r["variant"], r["seed"], r["steps"]) != key] + [row]
            write(out, header, rows)
            shown = "failed" if row["value"] is None else f"{row['value']:.4f}"
            log(f"{task.name} {spec} seed {seed}: {task.metric} {shown} ({row['train_s'] or 0:.1f} s training)"
                + (f" -- {row['notes'][-1]}" if row["status"] == "failed" else ""))
    if main_rank:
        write_leaderboard(rows, out, plots=plots, header=header)
    return rows


def _main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---- command line -----------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """Add ``headwise arena`` options to an :class:`argparse.ArgumentParser` (run it with :func:`main`)."""
    from headwise.arena.tasks import available_tasks

    parser.add_argument("--task", help=f"comma-separated tasks: {', '.join(available_tasks())}")
    parser.add_argument("--variants",
                        help='comma-separated variant specs, e.g. "mha(heads=1),moba(block=16, topk=2)" '
                        "(split on commas outside parentheses; default: every registered variant)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per (task, variant) (default 3)")
    parser.add_argument("--quick", action="store_true", help="each task's quick preset (e.g. MQAR 2000 steps)")
    parser.add_argument("--steps", type=int, help="training steps of every task (overrides the preset)")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE",
                        help="override a task's config field (a Python literal), e.g. --set mqar.batch=32 "
                        "--set 'mqar.pairs=(4, 8)'; repeatable")
    parser.add_argument("--out", required=True, help="output folder: results.json, leaderboard.md, plots/, "
                        "checkpoints/ (rerunning into it resumes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the arena's small models run fastest single-threaded, "
                        "and several threads contend badly on a shared machine)")
    parser.add_argument("--max-train-s", type=float, metavar="S",
                        help="stop a run whose training exceeds S seconds (row failed, checkpoint kept; rerun with a "
                        "larger budget resumes it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.add_argument("--merge", nargs="+", metavar="DIR[:TASK+TASK]",
                        help="instead of training, combine these arena folders (optionally only some tasks of each; "
                        "later ones win) into --out: results.json, leaderboard, plots")


def parse_overrides(items: Sequence[str]) -> dict[str, dict]:
    """``["mqar.batch=32", "mqar.pairs=(4, 8)"]`` -> ``{"mqar": {"batch": 32, "pairs": (4, 8)}}`` (values are
    Python literals, never evaluated)."""
    import ast

    out: dict[str, dict] = {}
    for item in items:
        target, sep, text = item.partition("=")
        task, dot, key = target.strip().partition(".")
        if not (sep and dot and task and key):
            raise ValueError(f"--set expects TASK.KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"--set {item!r}: {text.strip()!r} is not a Python literal") from None
        out.setdefault(task, {})[key] = value
    return out


def main(args) -> int:
    """Run the arena from parsed :func:`add_arguments` options; print the leaderboard; returns 0."""
    from headwise.arena.leaderboard import to_markdown

    if args.merge:
        rows = merge(args.out, args.merge, plots=not args.no_plots)
        print(to_markdown(rows))
        print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'leaderboard.md'}")
        return 0
    if not args.task:
        raise ValueError("--task is required (or --merge to combine finished runs)")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be a positive int, got {args.seeds}")
    if args.threads < 1:
        raise ValueError(f"--threads must be a positive int, got {args.threads}")
    torch.set_num_threads(args.threads)
    distributed = init_from_env()  # torchrun: data-parallel training over the launched ranks
    variants = split_specs(args.variants) if args.variants else None
    rows = run(args.task, variants, seeds=args.seeds, quick=args.quick, steps=args.steps, out=args.out,
               task_overrides=parse_overrides(args.set), progress=not args.no_progress, plots=not args.no_plots,
               max_train_s=args.max_train_s)
    if _main_rank():
        print(to_markdown(rows))
        print(f"wrote {Path(args.out) / 'results.json'}, {Path(args.out) / 'leaderboard.md'}")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
