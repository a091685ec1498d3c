"""Passkey retrieval (needle in a haystack) over a grid of context length x depth, token level.

After Mohtashami & Jaggi, "Landmark Attention" (2023): a passkey hidden in long repetitive filler text must be
recalled at the end. Token version (vocabulary ``PASSKEY_VOCAB = 20``):

* ``0 .. 9`` digits, ``KEY_MARK = 10`` ("the pass key is"), ``QUERY = 11`` ("what is the pass key?"),
  ``12 .. 19`` filler: position ``t`` holds ``12 + t % 8``, a periodic stand-in for the repeated sentence
  "The grass is green. The sky is blue. ..." of the original.
* the needle ``[KEY_MARK, d_1 .. d_k]`` (``k = key_len`` uniform digits) starts at ``floor(depth * S + 0.5)``, where
  ``S = seq_len - 2 k - 1`` is the last start that keeps it before the query: ``depth = 0`` puts it first,
  ``depth = 1`` right before the query; ``depth=None`` draws the start uniformly per example (training).
* the sequence ends with ``[QUERY, d_1 .. d_{k-1}]`` (teacher forcing) and is labelled ``d_1 .. d_k`` at those last
  ``k`` positions (``IGNORE_INDEX`` elsewhere); an example counts as solved when all ``k`` digits are right.

The grid of the issue is simply ``passkey_batch(..., seq_len=L, depth=f)`` for each ``L`` and ``f``.

>>> g = torch.Generator().manual_seed(0)
>>> inputs, targets = passkey_batch(16, seq_len=256, depth=0.5, generator=g)   # [16, 256] each
"""

from __future__ import annotations

import torch

from headwise.arena.data._common import check_fraction, check_generator
from headwise.arena.data.mqar import IGNORE_INDEX
from headwise.checks import check_positive_int

__all__ = ["passkey_batch", "PASSKEY_VOCAB", "KEY_MARK", "QUERY", "FILLER_PERIOD"]

KEY_MARK = 10  # token that introduces the passkey
QUERY = 11  # token that asks for it
FILLER_PERIOD = 8  # filler tokens 12 .. 19 repeat with this period
PASSKEY_VOCAB = 12 + FILLER_PERIOD


def passkey_batch(batch: int, *, seq_len: int, depth: float | None = None, key_len: int = 4,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(inputs, targets)``, int64 ``[batch, seq_len]``; labels only at the last ``key_len`` positions."""
    check_positive_int("batch", batch)
    check_positive_int("seq_len", seq_len)
    check_positive_int("key_len", key_len)
    check_generator(generator)
    if depth is not None:
        check_fraction("depth", depth)
    last_start = seq_len - 2 * key_len - 1
    if last_start < 0:
        raise ValueError(f"seq_len must be >= 2 * key_len + 1 (needle plus query), got {seq_len=} {key_len=}")
    digits = torch.randint(0, 10, (batch, key_len), generator=generator)  # (B, k)
    if depth is None:
        start = torch.randint(0, last_start + 1, (batch, 1), generator=generator)  # (B, 1)
    else:
        start = torch.full((batch, 1), int(depth * last_start + 0.5), dtype=torch.int64)
    inputs = (12 + torch.arange(seq_len) % FILLER_PERIOD).repeat(batch, 1)  # (B, L)
    needle = torch.cat([torch.full((batch, 1), KEY_MARK), digits], dim=1)  # (B, k+1)
    inputs.scatter_(1, start + torch.arange(key_len + 1), needle)
    inputs[:, seq_len - key_len] = QUERY
    inputs[:, seq_len - key_len + 1:] = digits[:, :-1]
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.int64)  # (B, L)
    targets[:, seq_len - key_len:] = digits
    return inputs, targets
