"""Induction-head copying (the synthetic task of H3 / Hyena), for length generalisation.

A sequence of ``seq_len`` tokens drawn uniformly from ``0 .. vocab - 2``; the trigger token ``vocab - 1`` appears
exactly twice: once at a uniformly random position ``p`` in ``0 .. seq_len - 3``, followed by the answer token
``b = inputs[p + 1]``, and once at the last position. The only label is ``targets[:, -1] = b``: having read the
trigger again, the model must copy the token that followed its first occurrence. Train at ``seq_len = 64`` and
test at 128 and 256 by changing ``seq_len`` only (the distribution of everything else is unchanged).

>>> g = torch.Generator().manual_seed(0)
>>> inputs, targets = induction_batch(32, seq_len=64, vocab=16, generator=g)   # [32, 64] each
"""

from __future__ import annotations

import torch

from headwise.arena.data._common import check_generator
from headwise.arena.data.mqar import IGNORE_INDEX
from headwise.checks import check_positive_int

__all__ = ["induction_batch"]


def induction_batch(batch: int, *, seq_len: int = 64, vocab: int = 16,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(inputs, targets)``, int64 ``[batch, seq_len]``; targets are ``IGNORE_INDEX`` except the last."""
    check_positive_int("batch", batch)
    check_positive_int("seq_len", seq_len)
    check_positive_int("vocab", vocab)
    check_generator(generator)
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4 (trigger, answer, filler, trigger), got {seq_len=}")
    if vocab < 3:
        raise ValueError(f"vocab must be >= 3 (two content tokens and the trigger), got {vocab=}")
    trigger = vocab - 1
    inputs = torch.randint(0, trigger, (batch, seq_len), generator=generator)  # (B, L) content tokens only
    first = torch.randint(0, seq_len - 2, (batch, 1), generator=generator)  # (B, 1) in 0 .. L-3
    inputs.scatter_(1, first, trigger)
    inputs[:, -1] = trigger
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.int64)  # (B, L)
    targets[:, -1] = inputs.gather(1, first + 1).squeeze(1)
    return inputs, targets
