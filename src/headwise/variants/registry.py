"""Name-to-class registry of attention modules and the variant spec strings that name them.

A registered class is a :class:`~headwise.variants.base.Variant`: a ``Config`` dataclass (one field per
constructor keyword, each with a one-line comment) from which its constructor is generated, and declared
``capabilities``. ``create("moba(block=512, topk=4)", dim=256, heads=8)`` parses the spec, merges its keywords
over the call's, checks them against ``Config`` and builds the module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from headwise.spec import parse_spec

__all__ = ["register", "create", "available", "get", "parse_spec", "config_fields"]

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    """Class decorator: register a :class:`~headwise.variants.base.Variant` subclass under ``name``."""

    def deco(cls):
        from headwise.variants.base import Variant

        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"variant {name=} is already registered to {_REGISTRY[name].__qualname__}")
        config = getattr(cls, "Config", None)
        if config is None or not dataclasses.is_dataclass(config):
            raise TypeError(f"{cls.__qualname__} needs a `Config` dataclass to be registered as {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, Variant)):
            raise TypeError(f"{cls.__qualname__} must subclass headwise.variants.base.Variant (declared capabilities, "
                            f"a generated constructor) to be registered as {name!r}")
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
    """The config field names of variant ``name``, in declaration order."""
    return [f.name for f in dataclasses.fields(get(name).Config)]


def create(spec: str, **config: Any) -> nn.Module:
    """Build a registered module from a name or spec string; keywords in the spec override ``config``.

    >>> m = create("mha(heads=1)", dim=64, heads=8)   # one head of dim 64
    """
    name, spec_kwargs = parse_spec(spec)
    cls = get(name)
    merged = {**cls.resolve_aliases(config), **cls.resolve_aliases(spec_kwargs)}
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(merged) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for variant {name!r}; valid keys: {sorted(fields)}")
    missing = [k for k, f in fields.items() if k not in merged and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"bad config for variant {name!r}: missing required field(s) {missing}")
    try:
        return cls(**merged)
    except TypeError as e:  # a value of the wrong type: a bad spec, reported like the other config errors
        raise ValueError(f"bad config for variant {name!r}: {e}") from None


def _load_builtin() -> None:
    # importing the package imports every variant module, which registers its classes
    import headwise.variants  # noqa: F401
