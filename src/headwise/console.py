"""Command-line helpers shared by every subcommand: the usage error, option parsing, the console.

A leaf module (it imports only rich, lazily). Every subcommand module has ``add_arguments(parser)`` and
``main(args) -> int``; bad input raises :class:`UsageError`, which ``headwise`` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import inspect
from contextlib import contextmanager

__all__ = ["UsageError", "user_input", "parse_sizes", "positive_int", "console", "summary_line",
           "add_report_arguments", "stderr_progress"]


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit status 2."""


@contextmanager
def user_input(what: str):
    """Turn a ValueError/TypeError raised while handling user input into a one-line :class:`UsageError`."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise UsageError(f"{what}: {e}") from None


def parse_sizes(text: str, option: str = "--grid") -> tuple[int, ...]:
    """``"32,32"`` or ``"32x32"`` -> ``(32, 32)``: 1 to 3 positive ints."""
    try:
        sizes = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(f"{option} must be comma-separated positive ints like 32,32, got {text!r}") from None
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise ValueError(f"{option} must have 1 to 3 positive sizes, got {text!r}")
    return sizes


def positive_int(text: str) -> int:
    """argparse ``type=``: a positive int."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def console():
    """A rich console; files and pipes get a wide one (tables are not squeezed into 80 columns)."""
    from rich.console import Console

    out = Console()
    if not out.is_terminal:
        out = Console(width=max(out.width, 200))
    return out


def summary_line(obj, limit: int = 140) -> str:
    """The first paragraph of ``obj``'s docstring on one line, cut at ``limit`` characters."""
    paragraph = inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0]
    text = " ".join(paragraph.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every ``headwise bench`` subcommand takes: ``--quick``, ``--json``, ``--markdown``,
    ``--no-progress``."""
    parser.add_argument("--quick", action="store_true", help="smaller shapes: seconds, not minutes")
    parser.add_argument("--json", metavar="PATH", help="write the header and rows as JSON here")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def stderr_progress(message: str) -> None:
    """The progress callback of the benchmarks: one indented line per step on stderr (off with --no-progress)."""
    import sys

    print(f"  {message}", file=sys.stderr)
