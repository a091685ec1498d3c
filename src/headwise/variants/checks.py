"""Config checks shared by every variant family: errors name the argument and its value."""

from __future__ import annotations

__all__ = ["check_positive_int", "check_bool", "resolve_head_dim"]


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {name}={value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")


def resolve_head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    """``head_dim`` if given (checked), else ``dim // heads`` (which must divide)."""
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads when head_dim is None, got {dim=} {heads=}; "
                             f"pass head_dim= to choose the head width")
        return dim // heads
    check_positive_int("head_dim", head_dim)
    return head_dim
