"""Argument checks shared by the arena task generators: errors name the argument and its value."""

from __future__ import annotations

import torch

__all__ = ["check_generator", "check_fraction", "python_seed"]


def check_generator(generator) -> torch.Generator:
    """Every generator takes an explicit ``torch.Generator`` so that a seed fixes the data."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
                        f"got generator={generator!r} ({type(generator).__name__})")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must live on the CPU (data is generated there), got {generator.device=}")
    return generator


def check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {name}={value!r} ({type(value).__name__})")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {name}={value!r}")


def python_seed(generator: torch.Generator) -> int:
    """Draw a seed for a Python-side RNG (e.g. ``random.Random``) from ``generator`` (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))
