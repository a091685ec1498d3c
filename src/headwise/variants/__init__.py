"""Attention modules, one file per mechanism (or one tight paper family), registered by name.

Importing this package imports every module in it, which registers its classes: ``headwise.create("moba")``
finds ``moba`` in ``variants/moba.py``. The base (:mod:`headwise.variants.base`) and the registry
(:mod:`headwise.variants.registry`) are the only modules that register nothing.
"""

import importlib
import pkgutil

from headwise.variants.registry import available, create, get, register

__all__ = ["available", "create", "get", "register"]

_NOT_VARIANTS = {"base", "registry"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_VARIANTS:
        importlib.import_module(f"{__name__}.{_module}")
