"""Argument checks shared by every layer: the error names the argument and its value.

A leaf module (it imports only torch), so that patterns, ops, variants and tools validate the same way.
"""

from __future__ import annotations

from typing import Iterable

from torch import Tensor

__all__ = ["check_positive_int", "check_bool", "check_choice", "check_number", "check_grid", "check_tokens",
           "check_feature_map", "is_number", "resolve_head_dim"]


def is_number(x) -> bool:
    """An int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {name}={value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {name}={value!r}")


def check_choice(name: str, value, choices: Iterable) -> None:
    """``value`` is one of ``choices`` (compared with ``==``)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {name}={value!r}")


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` is a number in the interval from ``low`` to ``high`` (closed unless ``*_open``); returns it as
    a float. The message states the interval, e.g. ``dropout must be a number in [0, 1), got dropout=1.5``."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    where = f" in {left}{'-inf' if low is None else _fmt(low)}, {'inf' if high is None else _fmt(high)}{right}"
    if not is_number(value):
        raise TypeError(f"{name} must be a number{where}, got {name}={value!r} ({type(value).__name__})")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value:  # NaN fails every comparison
        raise ValueError(f"{name} must be a number{where}, got {name}={value!r}")
    return float(value)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_grid(name: str, grid, ndim: int | tuple[int, ...] | None = None) -> tuple[int, ...]:
    """``grid`` is a tuple or list of positive ints (of length ``ndim`` when given); returns it as a tuple."""
    lengths = (ndim,) if isinstance(ndim, int) else ndim
    what = "positive ints" if lengths is None else " or ".join(map(str, lengths)) + " positive ints"
    if not (isinstance(grid, (tuple, list)) and grid and all(isinstance(g, int) and not isinstance(g, bool)
                                                             and g >= 1 for g in grid)):
        raise ValueError(f"{name} must be a tuple of {what}, got {name}={grid!r}")
    if lengths is not None and len(grid) not in lengths:
        raise ValueError(f"{name} must be a tuple of {what}, got {name}={grid!r}")
    return tuple(grid)


def check_tokens(name: str, x, dim: int, *, tokens: int | None = None) -> None:
    """``x`` is a tensor ``[B, N, C]`` with ``C = dim``, ``B, N >= 1`` (and ``N = tokens`` when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, N, C], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must be [B, N, C] with C = dim = {dim}, got {name}.shape={tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one batch element and token, got {name}.shape={tuple(x.shape)}")
    if tokens is not None and x.shape[1] != tokens:
        raise ValueError(f"{name} must have N = tokens = {tokens} tokens, got {name}.shape={tuple(x.shape)}")


def check_feature_map(name: str, x, channels: int) -> None:
    """``x`` is a tensor ``[B, C, H, W]`` (a CNN feature map) with ``C = channels``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be [B, C, H, W] with C = dim = {channels}, got {name}.shape={tuple(x.shape)}")


def resolve_head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    """``head_dim`` if given (checked), else ``dim // heads`` (which must divide)."""
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads when head_dim is None, got {dim=} {heads=}; "
                             f"pass head_dim= to choose the head width")
        return dim // heads
    check_positive_int("head_dim", head_dim)
    return head_dim
