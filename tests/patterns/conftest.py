"""Shared checks for pattern tests."""

import pytest
import torch

from headwise.patterns.base import Pattern, TileSchedule


def check_schedule_exact(pattern: Pattern, sched: TileSchedule, head: int | None = None) -> None:
    """``sched`` must equal the exhaustive schedule built on the same tiles and permutations, entry for entry."""
    n_q, n_kv = sched.n_q, sched.n_kv
    for name, perm, n in [("q_perm", sched.q_perm, n_q), ("kv_perm", sched.kv_perm, n_kv)]:
        if perm is not None:
            assert torch.equal(torch.sort(perm).values, torch.arange(n)), f"{name} is not a permutation"
    assert sched.q_bounds[0] == 0 and sched.q_bounds[-1] == n_q and (sched.q_bounds.diff() > 0).all()
    assert sched.kv_bounds[0] == 0 and sched.kv_bounds[-1] == n_kv and (sched.kv_bounds.diff() > 0).all()
    truth = pattern.exhaustive_schedule(n_q, n_kv, head=head, q_bounds=sched.q_bounds, kv_bounds=sched.kv_bounds,
                                        q_perm=sched.q_perm, kv_perm=sched.kv_perm)
    assert torch.equal(sched.tile_states(), truth.tile_states())
    assert torch.equal(sched.kv_tiles, truth.kv_tiles)  # ascending, padded with -1, same width
    assert torch.equal(sched.full, truth.full)


@pytest.fixture
def schedule_exact():
    return check_schedule_exact
