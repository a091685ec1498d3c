"""Benchmarks: measured ratios against dense attention and peer libraries (never asserted in tests).

``headwise bench patterns`` runs :func:`headwise.bench.patterns.run_pattern_bench`; the timing and memory
method every benchmark shares is in :mod:`headwise.bench.timing`.
"""

from headwise.bench.patterns import CASES, QUICK_CASES, BenchCase, BenchReport, run_pattern_bench, to_markdown
from headwise.bench.timing import Timing, peak_memory_mb, time_call

__all__ = [
    "BenchCase",
    "BenchReport",
    "CASES",
    "QUICK_CASES",
    "run_pattern_bench",
    "to_markdown",
    "Timing",
    "time_call",
    "peak_memory_mb",
]
