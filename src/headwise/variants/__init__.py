"""Attention modules by family; importing this package registers them."""

from headwise.variants.registry import available, create, get, register

__all__ = ["available", "create", "get", "register"]
