"""Name-to-class registry of attention modules and the variant spec strings that name them.

A registered class has a ``Config`` dataclass (one field per constructor keyword, each with a one-line
comment) and an ``__init__`` taking those fields as keywords. ``create("moba(block=512, topk=4)", dim=256,
heads=8)`` parses the spec, merges its keywords over the call's, validates them against ``Config`` and builds
the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from headwise.spec import parse_spec

__all__ = ["register", "create", "available", "get", "parse_spec", "config_fields"]

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    """Class decorator: register a module class under ``name`` (must have a ``Config`` dataclass)."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"variant {name=} is already registered to {_REGISTRY[name].__qualname__}")
        config = getattr(cls, "Config", None)
        if config is None or not dataclasses.is_dataclass(config):
            raise TypeError(f"{cls.__qualname__} needs a `Config` dataclass to be registered as {name!r}")
        _REGISTRY[name] = cls
        cls.registry_name = name
        return cls

    return deco


def available() -> list[str]:
    """Sorted names of every registered variant."""
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> type[nn.Module]:
    """The class registered under ``name``; an unknown name raises and lists what exists."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown variant {name=}; available: {', '.join(sorted(_REGISTRY))}") from None


def config_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get(name).Config)]


def create(spec: str, **config: Any) -> nn.Module:
    """Build a registered module from a name or spec string; keywords in the spec override ``config``.

    >>> m = create("mha(heads=1)", dim=64, heads=8)   # one head of dim 64
    """
    name, spec_kwargs = parse_spec(spec)
    cls = get(name)
    merged = {**config, **spec_kwargs}
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for variant {name!r}; valid keys: {sorted(names)}")
    try:
        cfg = cls.Config(**merged)
    except TypeError as e:  # missing required fields
        raise ValueError(f"bad config for variant {name!r}: {e}") from None
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def _load_builtin() -> None:
    # importing the families registers their classes
    import headwise.variants  # noqa: F401
