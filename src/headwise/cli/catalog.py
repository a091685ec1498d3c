"""``headwise list``: every registered variant (its config fields, file and declared capabilities) and every
pattern name."""

from __future__ import annotations

import dataclasses

import headwise
from headwise.console import console, summary_line
from headwise.patterns.draw import pattern_catalog

__all__ = ["add_arguments", "main"]


def add_arguments(parser) -> None:
    """``headwise list`` has no options."""


def main(args) -> int:
    """Print the registered variants (config fields, file, capabilities) and the pattern names."""
    from rich.table import Table

    from headwise.variants.registry import get

    out = console()
    variants = Table(title="variants  (headwise.create(\"name(key=value)\", dim=..., heads=...))", title_justify="left")
    variants.add_column("name", no_wrap=True)
    variants.add_column("file", no_wrap=True)
    variants.add_column("capabilities")
    variants.add_column("config")
    variants.add_column("description")
    for name in headwise.available():
        cls = get(name)
        fields = []
        for f in dataclasses.fields(cls.Config):
            has_default = f.default is not dataclasses.MISSING
            fields.append(f"{f.name}={f.default!r}" if has_default else f.name)
        file = "variants/" + cls.__module__.rsplit(".", 1)[-1] + ".py"
        variants.add_row(name, file, cls.capabilities.describe(), ", ".join(fields), summary_line(cls))
    out.print(variants)
    patterns = Table(title="patterns  (headwise show-pattern \"name(key=value)\" --grid ...)", title_justify="left")
    patterns.add_column("name", no_wrap=True)
    patterns.add_column("arguments")
    patterns.add_column("description")
    for row in pattern_catalog():
        patterns.add_row(*row)
    out.print(patterns)
    return 0
