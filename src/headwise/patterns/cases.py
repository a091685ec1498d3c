"""Named patterns at benchmark shapes: the cases of ``headwise bench patterns`` and ``headwise simulate bench``.

Each :class:`BenchCase` is a pattern spec over a token grid and the attention shape it runs at (fp32, ``B=1, H=8,
D=64`` unless it says otherwise). The lists hold the papers' settings (``CASES``, ``STRUCTURED_CASES``) and
seconds-long versions of the same kinds (``QUICK_CASES``, ``STRUCTURED_QUICK_CASES``). Here, below both tools, so
the benchmark can use the simulator and the simulator the cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from headwise.patterns.base import Pattern
from headwise.patterns.spec import from_spec

__all__ = ["BenchCase", "CASES", "QUICK_CASES", "STRUCTURED_CASES", "STRUCTURED_QUICK_CASES", "select_cases"]


@dataclass(frozen=True)
class BenchCase:
    """One benchmark case: a pattern over a token grid and the attention shape it runs at."""

    name: str  # row label, e.g. "2d-neighborhood"
    pattern: str | Pattern  # a pattern spec (built by headwise.patterns.from_spec with grid=) or a Pattern
    grid: tuple[int, ...]  # token grid, flattened row-major to N = prod(grid) tokens
    heads: int = 8  # H
    head_dim: int = 64  # D
    batch: int = 1  # B

    def __post_init__(self):
        if not self.grid or any(not isinstance(s, int) or s < 1 for s in self.grid):
            raise ValueError(f"grid must be a non-empty tuple of positive ints, got {self.grid=!r}")
        for name in ("heads", "head_dim", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    @property
    def shape(self) -> str:
        return "x".join(str(s) for s in self.grid)

    @property
    def spec(self) -> str:
        return self.pattern if isinstance(self.pattern, str) else repr(self.pattern)

    def build_pattern(self) -> Pattern:
        if isinstance(self.pattern, Pattern):
            return self.pattern
        return from_spec(self.pattern, grid=self.grid)


# The cases of the issue: fp32, B=1, H=8, D=64, about 2-3 % density each.
CASES: tuple[BenchCase, ...] = (
    BenchCase("1d-neighborhood", "neighborhood(kernel_size=513)", (16384,)),
    BenchCase("1d-causal-window", "neighborhood(kernel_size=513, causal=True)", (16384,)),
    BenchCase("2d-neighborhood", "neighborhood(kernel_size=(17, 17))", (128, 128)),
    BenchCase("3d-neighborhood", "neighborhood(kernel_size=(5, 9, 9))", (16, 32, 32)),
    BenchCase("1d-blocked", "neighborhood(kernel_size=512, stride=512)", (16384,)),
)

# The structured patterns of issue 5 (headwise.patterns.structured), at their papers' settings: densities from
# 1.6 % (MaxViT) to 55 % (radial at 16 frames: its O(n log n) saving grows with the number of frames).
STRUCTURED_CASES: tuple[BenchCase, ...] = (
    BenchCase("2d-maxvit-block", "maxvit_block(window=8)", (64, 64)),
    BenchCase("2d-maxvit-grid", "maxvit_grid(grid_size=8)", (64, 64)),
    BenchCase("2d-halo", "halo(block=8, halo=3)", (64, 64)),
    BenchCase("1d-s2", "s2(heads=8, local_blocks=4, vertical_stride=8)", (16384,)),
    BenchCase("3d-radial", "radial(frames=16, tokens_per_frame=1024)", (16, 1024)),
)

# The same kinds at 2-4k tokens and similar densities: the whole quick run takes seconds, not minutes.
QUICK_CASES: tuple[BenchCase, ...] = (
    BenchCase("1d-neighborhood", "neighborhood(kernel_size=129)", (4096,)),
    BenchCase("1d-causal-window", "neighborhood(kernel_size=129, causal=True)", (4096,)),
    BenchCase("2d-neighborhood", "neighborhood(kernel_size=(13, 13))", (64, 64)),
    BenchCase("3d-neighborhood", "neighborhood(kernel_size=(3, 5, 5))", (8, 16, 16)),
    BenchCase("1d-blocked", "neighborhood(kernel_size=128, stride=128)", (4096,)),
)

STRUCTURED_QUICK_CASES: tuple[BenchCase, ...] = (
    BenchCase("2d-maxvit-block", "maxvit_block(window=8)", (32, 32)),
    BenchCase("2d-maxvit-grid", "maxvit_grid(grid_size=8)", (32, 32)),
    BenchCase("2d-halo", "halo(block=8, halo=3)", (32, 32)),
    BenchCase("1d-s2", "s2(heads=8, local_blocks=2, vertical_stride=8)", (4096,)),
    BenchCase("3d-radial", "radial(frames=8, tokens_per_frame=256)", (8, 256)),
)


def select_cases(cases: Sequence[BenchCase], names: Iterable[str] | None) -> list[BenchCase]:
    """The cases named (in the order given); ``None`` keeps all. An unknown name raises and lists the valid ones."""
    if names is None:
        return list(cases)
    by_name = {c.name: c for c in cases}
    chosen = []
    for name in names:
        if name not in by_name:
            raise ValueError(f"unknown benchmark case {name!r}; valid: {', '.join(by_name)}")
        chosen.append(by_name[name])
    return chosen
