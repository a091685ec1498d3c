"""Wall-clock timing and peak-memory measurement of one call, the way every headwise benchmark measures.

Timing (:func:`time_call`): one warm-up call (timed separately as ``first_ms``: it includes compilation,
schedule construction and cache fills), then ``repeats`` calls each timed with :func:`time.perf_counter`
(bracketed by ``torch.cuda.synchronize`` on a GPU). We report the minimum, the least noisy estimate of what the
code costs on a shared machine, and the median, which shows how noisy the run was. With ``max_s``, repeats stop
early once the warm-up and the timed calls together have taken that long (at least one timed call always
runs), so a very slow peer does not stall a whole benchmark.

Peak memory (:func:`peak_memory_mb`): on CPU, a background thread reads the resident set size from
``/proc/self/statm`` every ``interval_s`` while the call runs; the result is the highest sample minus the RSS
just before the call, after ``gc.collect()`` and glibc ``malloc_trim(0)`` (so freed memory the allocator was
holding does not hide the call's allocations). It counts everything the call touches, its output included,
at a resolution of about ``interval_s``: a call shorter than that may be under-reported. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocated memory before the call. Where neither is available
(no ``/proc``) it returns ``None``.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "time_call", "peak_memory_mb"]

_STATM = "/proc/self/statm"


@dataclass(frozen=True)
class Timing:
    """Milliseconds of one warm-up call and of each timed repeat."""

    first_ms: float  # the warm-up call (compilation, caches)
    samples_ms: tuple[float, ...]  # each timed repeat, in order

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], object],
    repeats: int = 3,
    device: torch.device | str | None = None,
    max_s: float | None = None,
) -> Timing:
    """Time ``fn()``: one warm-up call, then up to ``repeats`` timed calls (see the module docstring)."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats=!r}")
    if max_s is not None and not max_s > 0:
        raise ValueError(f"max_s must be positive or None, got {max_s=!r}")

    def once() -> float:
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        ms = (time.perf_counter() - t0) * 1e3
        del out
        return ms

    first = once()
    samples = [once()]
    while len(samples) < repeats and (max_s is None or (first + sum(samples)) / 1e3 < max_s):
        samples.append(once())
    return Timing(first, tuple(samples))


def _rss_bytes() -> int:
    with open(_STATM, "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include memory the allocator holds
        pass


def peak_memory_mb(
    fn: Callable[[], object], device: torch.device | str | None = None, interval_s: float = 0.0005
) -> float | None:
    """Peak extra memory of one call of ``fn()`` in MiB (method in the module docstring), or None."""
    if device is not None and torch.device(device).type == "cuda":
        _release_free_memory()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 2**20
    if not os.path.exists(_STATM):
        return None
    _release_free_memory()
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = fn()
        after = _rss_bytes()  # the output, at least, is still alive here
        del out
    finally:
        done.set()
        sampler.join()
    return max(peak - base, after - base, 0) / 2**20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(tool: str) -> dict:
    """The machine part of every benchmark's JSON header: what a reader needs to interpret the numbers."""
    import headwise

    return {
        "tool": tool,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "headwise": headwise.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        # other processes on a shared machine slow every timing
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
