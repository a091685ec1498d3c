"""Induction-head copying: one trigger pair, label at the end only, lengths 64/128/256, seeding."""

import pytest
import torch

from headwise.arena.data import IGNORE_INDEX, induction_batch


@pytest.mark.parametrize("seq_len", [4, 64, 128, 256], ids=lambda n: f"L{n}")
def test_layout(seq_len):
    vocab = 16
    inputs, targets = induction_batch(200, seq_len=seq_len, vocab=vocab, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (200, seq_len) and inputs.dtype == targets.dtype == torch.int64
    trigger = inputs == vocab - 1
    assert (trigger.sum(1) == 2).all() and trigger[:, -1].all()
    assert not (targets[:, :-1] != IGNORE_INDEX).any()
    first = trigger.float().argmax(1)  # (B,)
    assert (first <= seq_len - 3).all()
    assert torch.equal(targets[:, -1], inputs.gather(1, (first + 1).unsqueeze(1)).squeeze(1))
    assert ((0 <= targets[:, -1]) & (targets[:, -1] < vocab - 1)).all()


def test_first_trigger_position_is_uniform():
    inputs, _ = induction_batch(20_000, seq_len=8, vocab=6, generator=torch.Generator().manual_seed(1))
    first = (inputs == 5).float().argmax(1)
    freq = torch.bincount(first, minlength=6).double() / 20_000
    assert torch.allclose(freq, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.015)


def test_seed_reproducible():
    a = induction_batch(8, generator=torch.Generator().manual_seed(2))
    b = induction_batch(8, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [dict(seq_len=3), dict(vocab=2), dict(seq_len=64.0)], ids=["L3", "V2", "float"])
def test_bad_arguments(kwargs):
    with pytest.raises((ValueError, TypeError)):
        induction_batch(2, generator=torch.Generator(), **kwargs)
