"""The ``headwise`` command line.

    headwise list                                   registered variants (config, capabilities) and pattern names
    headwise show-pattern SPEC --grid 32,32         density, tile schedule, ASCII mask (N <= 64), --out x.png
    headwise bench patterns [--quick] [--peers]     block-sparse vs dense SDPA (and peers)
    headwise bench variants [--quick]               every registered variant vs mha
    headwise bench linear [--quick]                 chunked linear attention vs causal SDPA
    headwise bench distributed [--quick]            ring / head-parallel attention on P gloo processes (per rank)
    headwise bench dynamic [--quick]                MoBA, VMoBA, DMA, HiP vs dense SDPA
    headwise simulate SPEC --grid 128,128           attended pairs, tiles, tile-level FLOPs, upper-bound speedup
    headwise simulate decode --params 8e9 ...       Kinetics decoding cost: dense vs sparse attention per token
    headwise moa-plan --task mqar --out plan.json   MoA: profile, MILP plan search, per-head window plan JSON
    headwise inspect --demo --out DIR               what every head does: metrics.json, PNGs, report.html
    headwise arena --task mqar --variants mha,linear --quick --out DIR   train and compare variants; leaderboard
    headwise demo [--out runs]                      a short tour; writes runs/demo-<timestamp>/report.md

Every subcommand is a module with ``add_arguments(parser)`` and ``main(args) -> int`` (:data:`COMMANDS`); every
``bench`` subcommand takes ``--quick``, ``--json``, ``--markdown`` and ``--no-progress``. ``main(argv)`` returns
the exit status: 0 on success, 2 for bad input (a one-line message on stderr, no traceback). ``python -m
headwise`` is the same program.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Sequence

import headwise
from headwise.console import UsageError, summary_line, user_input

__all__ = ["main", "build_parser", "COMMANDS", "Command"]


@dataclass(frozen=True)
class Command:
    """One subcommand: the module that has its ``add_arguments`` and ``main``."""

    name: str  # as typed: "show-pattern", "bench patterns"
    module: str  # the module path
    help: str  # one line for `headwise --help`
    user_errors: bool = False  # ValueError/TypeError/OSError out of main are bad input (exit 2), not bugs


COMMANDS: tuple[Command, ...] = (
    Command("list", "headwise.cli.catalog", "registered variants (config fields, capabilities) and pattern names"),
    Command("show-pattern", "headwise.cli.show_pattern", "density, tile schedule and a picture of a pattern's mask"),
    Command("bench patterns", "headwise.bench.patterns", "block-sparse attention vs dense SDPA (and peers) on sparse patterns"),
    Command("bench variants", "headwise.bench.variants", "every registered variant vs mha: parameters, forward time, memory"),
    Command("bench linear", "headwise.bench.linear", "chunked linear attention vs causal SDPA and the naive form: time per token"),
    Command("bench distributed", "headwise.bench.distributed",
            "ring / head-parallel attention on P local gloo processes: per-rank time, memory, communication"),
    Command("bench dynamic", "headwise.bench.dynamic", "content-aware block selection (MoBA, VMoBA, DMA, HiP) vs dense SDPA",
            user_errors=True),
    Command("simulate", "headwise.simulate.report", "upper-bound speedup of a pattern from its tiles; Kinetics decoding cost",
            user_errors=True),
    Command("moa-plan", "headwise.moa.cli", "MoA: profile a small LM on a task, search per-head elastic windows, write the plan",
            user_errors=True),
    Command("arena", "headwise.arena.runner", "train and compare variants on recall, in-context regression, images, text",
            user_errors=True),
    Command("inspect", "headwise.analysis.command",
            "what every head does: metrics JSON, plots and report.html (--demo: a small trained LM)"),
    Command("demo", "headwise.demo", "a short tour: patterns, a correctness check, the quick benchmark, a report"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headwise",
        description="Multi-head attention variants behind one interface: list them, look at patterns, measure.",
    )
    parser.add_argument("--version", action="version", version=f"headwise {headwise.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        module = importlib.import_module(cmd.module)
        words = cmd.name.split()
        target = sub
        if len(words) == 2:  # "bench patterns": a subcommand of a group
            if words[0] not in groups:
                group = sub.add_parser(words[0], help="benchmarks (ratios against dense attention and peers)")
                groups[words[0]] = group.add_subparsers(dest=words[0], required=True, metavar="BENCHMARK")
            target = groups[words[0]]
        p = target.add_parser(words[-1], help=cmd.help, description=summary_line(module, limit=400))
        module.add_arguments(p)
        p.set_defaults(command_spec=cmd, command_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None, *, cases=None) -> int:
    """Run the CLI; returns the exit status. ``cases`` replaces the benchmark's case list (bench patterns, demo)."""
    args = build_parser().parse_args(argv)
    args.case_list = cases
    cmd: Command = args.command_spec
    try:
        if not cmd.user_errors:
            return args.command_main(args)
        try:
            with user_input(cmd.name):
                return args.command_main(args)
        except OSError as e:
            raise UsageError(f"{cmd.name}: {e.filename}: {e.strerror or e}") from None
    except UsageError as e:
        print(f"headwise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
