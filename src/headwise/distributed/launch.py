"""Run a function on P local CPU processes joined by a gloo process group (tests and the distributed benchmark).

Production runs use ``torchrun`` (README); this is the in-process equivalent for one machine: it spawns ``P``
processes (``torch.multiprocessing``, start method ``spawn``), initializes ``torch.distributed`` in each on a free
localhost port, calls ``fn(rank, world, *args)`` and returns what each rank returned or raised. A rank that
hangs is terminated after ``timeout`` seconds and reported as such, so a caller never hangs.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankResult", "run_local", "free_port"]


@dataclass(frozen=True)
class RankResult:
    """What one rank of :func:`run_local` returned (``ok``) or raised."""

    rank: int  # the process's rank
    ok: bool  # fn returned without raising
    value: Any = None  # fn's return value (picklable)
    error: str | None = None  # "ExceptionType: message" when it raised, "timed out ..." when it hung
    traceback: str | None = None  # the formatted traceback when it raised


def free_port() -> int:
    """A TCP port on localhost that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, results, pg_timeout_s: float,
            threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world, *args)
    except BaseException as e:  # report, then exit at once, like a crashed rank: the peers see the connection drop
        results.put(RankResult(rank, False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    results.put(RankResult(rank, True, value))
    dist.destroy_process_group()


def run_local(fn: Callable, world: int, *args, timeout: float = 120.0, pg_timeout: float = 30.0,
              threads: int = 1) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes joined by a gloo group; one result per rank.

    Args:
        fn: a picklable (module-level) function; its return value must be picklable.
        world: number of processes ``P``.
        timeout: seconds after which ranks still running are terminated and reported as timed out.
        pg_timeout: the process group's timeout (how long a rank waits on a silent peer before raising).
        threads: ``torch.set_num_threads`` in each process.
    """
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int, got {world=!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, results, pg_timeout, threads), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    while len(got) < world and time.monotonic() < deadline:
        try:
            res = results.get(timeout=0.2)
            got[res.rank] = res
        except queue_mod.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(max(0.0, min(5.0, deadline - time.monotonic())))
    for r, p in enumerate(procs):
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        if r not in got:
            why = f"timed out after {timeout} s" if time.monotonic() >= deadline else f"exited with code {p.exitcode}"
            got[r] = RankResult(r, False, error=f"rank {r} {why} without reporting")
    results.close()
    return [got[r] for r in range(world)]
