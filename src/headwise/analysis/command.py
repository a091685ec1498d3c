"""``headwise inspect``: the command line of :mod:`headwise.analysis` (wired into :mod:`headwise.cli`).

    headwise inspect --demo --out DIR                     train the demo model (~1 min), write the report
    headwise inspect CHECKPOINT --task induction --spec mha --out DIR

Writes ``DIR/metrics.json``, ``DIR/metrics.schema.json``, PNGs and ``DIR/report.html``
(:func:`headwise.analysis.report.inspect_model`); ``--demo`` also saves ``DIR/demo-model.pt``, which
``headwise inspect DIR/demo-model.pt`` reloads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["add_arguments", "main", "parse_segment"]


def parse_segment(text: str) -> slice:
    """``"START:STOP"`` -> ``slice(START, STOP)`` (tokens removed for head divergence)."""
    try:
        start, stop = (int(t) for t in text.split(":"))
    except ValueError:
        raise ValueError(f"--segment must be START:STOP with ints, like 1:16, got {text!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"--segment needs 0 <= START < STOP, got {text!r}")
    return slice(start, stop)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="checkpoint of an arena model (headwise.arena.train, or --demo's "
                   "demo-model.pt); omit with --demo")
    p.add_argument("--demo", action="store_true", help="train the built-in demo model (2-layer mha LM on the "
                   "induction task) and inspect it")
    p.add_argument("--steps", type=int, default=800, help="demo training steps (default 800, about a minute)")
    p.add_argument("--task", help="arena task of the checkpoint (e.g. induction, mqar); default: what it records")
    p.add_argument("--spec", help="variant spec of the checkpoint's mixers (e.g. mha); default: what it records")
    p.add_argument("--quick", action="store_true", help="the checkpoint was trained with the task's quick preset")
    p.add_argument("--segment", help="tokens START:STOP removed for head divergence (default 1:N/2)")
    p.add_argument("--max-queries", type=int, default=64, help="query rows kept per attention map (default 64)")
    p.add_argument("--clusters", type=int, default=4, help="head pattern clusters (default 4)")
    p.add_argument("--seed", type=int, default=0, help="demo training seed (default 0)")
    p.add_argument("--out", default="runs/inspect", help="output folder (default runs/inspect)")
    p.add_argument("--no-figures", action="store_true", help="JSON and HTML tables only, no PNGs (faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``headwise inspect``; bad input prints one line and returns 2."""
    from headwise.analysis.report import inspect_model
    from headwise.analysis.subjects import checkpoint_subject, demo_subject

    try:
        if args.demo == bool(args.checkpoint):
            raise ValueError("give either a CHECKPOINT or --demo (not both)")
        for name in ("steps", "max_queries", "clusters"):
            value = getattr(args, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
        segment = parse_segment(args.segment) if args.segment else None
        out = Path(args.out)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the demo model is tiny: one thread avoids OpenMP spin-waits on a busy machine
        try:
            if args.demo:
                subject = demo_subject(args.steps, seed=args.seed, progress=not args.no_progress,
                                       save=out / "demo-model.pt")
                if segment is not None:
                    subject.divergence = (subject.divergence[0], subject.divergence[1], segment)
            else:
                subject = checkpoint_subject(args.checkpoint, task=args.task, spec=args.spec, quick=args.quick,
                                             segment=segment)
            metrics = inspect_model(subject, out, max_queries=args.max_queries, clusters=args.clusters,
                                    figures=not args.no_figures)
        finally:
            torch.set_num_threads(threads)
    except (ValueError, TypeError, OSError) as e:
        print(f"headwise: error: inspect: {e}", file=sys.stderr)
        return 2
    training = metrics["model"].get("training") or {}
    if "final_loss" in training:
        print(f"trained {training['steps']} steps in {training['train_s']} s: loss {training['first_loss']} -> "
              f"{training['final_loss']}" + (f", accuracy {training['accuracy']}" if "accuracy" in training else ""))
    print(f"{len(metrics['layers'])} attention layers, {len(metrics['figures'])} figures")
    print(f"wrote {out / 'report.html'}")
    return 0
