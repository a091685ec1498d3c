"""Patterns from spec strings: ``from_spec("neighborhood(kernel_size=17)", grid=(128, 128))``."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from headwise.patterns.base import Causal, Full, Pattern
from headwise.patterns.neighborhood import Neighborhood, blocked
from headwise.patterns.segments import Segments
from headwise.patterns.structured import ConvWindow, Halo, Isolation, MaxViTBlock, MaxViTGrid, Radial, RegionAttention, S2Shards
from headwise.patterns.window import SlidingWindow
from headwise.spec import parse_spec

__all__ = ["PATTERNS", "from_spec"]

PATTERNS: dict[str, Callable[..., Pattern]] = {
    "full": Full,
    "causal": Causal,
    "neighborhood": Neighborhood,
    "blocked": blocked,
    "window": SlidingWindow,
    "segments": Segments,
    "maxvit_block": MaxViTBlock,
    "maxvit_grid": MaxViTGrid,
    "halo": Halo,
    "conv_window": ConvWindow,
    "radial": Radial,
    "s2": S2Shards,
    "region": RegionAttention,
    "isolation": Isolation,
}


def from_spec(spec: str, **defaults: Any) -> Pattern:
    """Build a pattern from ``"name"`` or ``"name(key=literal, ...)"`` (names: :data:`PATTERNS`).

    ``defaults`` are context a caller offers every pattern (e.g. ``grid=`` from the command line): each is passed
    only to patterns that take that keyword, and the spec's own keys override it. An unknown name, an unknown
    key, or a missing required argument raises ``ValueError`` naming it.

    >>> from_spec("neighborhood(kernel_size=17)", grid=(128, 128))  # doctest: +ELLIPSIS
    Neighborhood(grid=(128, 128), kernel_size=(17, 17), ...)
    >>> from_spec("causal", grid=(128, 128))
    Causal(offset=0)
    """
    name, kwargs = parse_spec(spec)
    if name not in PATTERNS:
        raise ValueError(f"unknown pattern {name!r} in spec {spec!r}; valid names: {', '.join(PATTERNS)}")
    factory = PATTERNS[name]
    params = inspect.signature(factory).parameters
    for key in kwargs:
        if key not in params:
            raise ValueError(f"unknown key {key!r} for pattern {name!r} in spec {spec!r}; "
                             f"valid keys: {', '.join(params) or '(none)'}")
    args = {key: value for key, value in defaults.items() if key in params} | kwargs
    missing = [key for key, p in params.items() if p.default is inspect.Parameter.empty and key not in args]
    if missing:
        raise ValueError(f"pattern {name!r} needs {', '.join(missing)} (in the spec {spec!r} or as a keyword)")
    return factory(**args)
