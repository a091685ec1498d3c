"""Spec strings: ``"name"`` or ``"name(key=literal, ...)"``, parsed safely (literals only, never eval).

Used for variants (``headwise.create("moba(block=512, topk=4)")``), patterns on the command line
(``headwise show-pattern "neighborhood(kernel_size=7)" --grid 32,32``) and every later tool.
"""

from __future__ import annotations

import ast
from typing import Any

__all__ = ["parse_spec"]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``"name"`` or ``"name(key=literal, ...)"`` into ``(name, kwargs)``.

    Values must be Python literals (numbers, strings, booleans, None, tuples, lists, dicts); nothing is
    evaluated. A malformed spec raises ``ValueError`` naming it.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"malformed variant spec {spec!r}: {e.msg}") from None
    if isinstance(tree, ast.Name):
        return tree.id, {}
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise ValueError(f"malformed variant spec {spec!r}: expected name or name(key=value, ...)")
    if tree.args:
        raise ValueError(f"malformed variant spec {spec!r}: arguments must be keywords (key=value)")
    kwargs: dict[str, Any] = {}
    for kw in tree.keywords:
        if kw.arg is None:
            raise ValueError(f"malformed variant spec {spec!r}: ** is not allowed")
        if kw.arg in kwargs:
            raise ValueError(f"malformed variant spec {spec!r}: repeated key {kw.arg!r}")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(
                f"malformed variant spec {spec!r}: value of {kw.arg!r} is not a literal ({ast.unparse(kw.value)})"
            ) from None
    return tree.func.id, kwargs
