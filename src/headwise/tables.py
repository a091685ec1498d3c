"""Result tables shared by every tool (bench, arena, simulate, moa-plan): columns, markdown, rich rendering.

A leaf module (it imports only rich, lazily), so that tools format their rows the same way without importing
each other.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Column", "fmt_ms", "first_line", "cells", "row_notes", "markdown_table", "plain_rich_table",
           "print_table", "print_report"]


def fmt_ms(x: float) -> str:
    """Milliseconds with 3-4 significant digits: ``5282``, ``57.2``, ``0.125``."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def first_line(e: BaseException, limit: int = 160) -> str:
    """``"TypeName: first line of the message"`` (cut at ``limit`` characters): an error in one table cell."""
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:limit]}"


@dataclass(frozen=True)
class Column:
    key: str  # the row field
    title: str  # the header
    fmt: Callable[[Any], str]  # value -> cell text (None values print as an em dash)


def cells(row: dict, columns: Sequence[Column]) -> list[str]:
    return ["—" if row.get(c.key) is None else c.fmt(row[c.key]) for c in columns]


def row_notes(rows: Sequence[dict], key: str = "case") -> list[str]:
    """Each distinct note of the rows' ``notes`` once: bare when every row has it, else prefixed with the
    ``key`` of the rows that have it."""
    where: dict[str, list[str]] = {}
    for r in rows:
        for note in r.get("notes", ()):
            where.setdefault(note, []).append(str(r[key]))
    return [note if len(names) == len(rows) > 1 else f"{', '.join(names)}: {note}" for note, names in where.items()]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column], left: Sequence[str], extra: Sequence[str] = ()) -> str:
    """A GitHub markdown table of ``rows`` (``left`` keys left-aligned, the rest right), then ``extra`` bullets."""
    lines = ["| " + " | ".join(c.title for c in columns) + " |",
             "|" + "|".join("---" if c.key in left else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(cells(r, columns)) + " |" for r in rows]
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def plain_rich_table(rows: Sequence[dict], columns: Sequence[Column], left: Sequence[str], title: str | None,
                     caption: Sequence[str] = ()):
    """The same table as :func:`markdown_table`, as a :class:`rich.table.Table` (cells never wrap)."""
    from rich.table import Table

    table = Table(title=title, caption="\n".join(caption) or None, caption_justify="left")
    for c in columns:
        table.add_column(c.title, justify="left" if c.key in left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*cells(r, columns))
    return table


def print_table(table, console=None) -> None:
    """Print a rich table without truncating cells: wider than the console, it is printed at its own width."""
    from rich.console import Console

    console = console or Console()
    probe = Console(width=4096, file=io.StringIO(), color_system=None)
    with probe.capture() as captured:
        probe.print(table)
    needed = max(len(line.rstrip()) for line in captured.get().splitlines())
    if needed > console.width:
        console = Console(file=console.file, width=needed, force_terminal=console.is_terminal)
    console.print(table)


def print_report(table, markdown: str, markdown_path: str | None, json_path: str | None) -> None:
    """The end of every ``headwise bench`` command: print the rich ``table``, write ``markdown`` to
    ``markdown_path`` when given, and say which files were written."""
    print_table(table)
    if markdown_path:
        path = Path(markdown_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown)
        print(f"wrote {path}")
    if json_path:
        print(f"wrote {json_path}")
