"""Passkey retrieval: needle placement over the depth grid, query and labels, seeding."""

import pytest
import torch

from headwise.arena.data import IGNORE_INDEX, KEY_MARK, PASSKEY_VOCAB, QUERY, passkey_batch


@pytest.mark.parametrize("seq_len", [9, 64, 257], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0, None], ids=lambda d: f"depth{d}")
def test_grid_layout(seq_len, depth):
    k = 4
    inputs, targets = passkey_batch(16, seq_len=seq_len, depth=depth, key_len=k,
                                    generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (16, seq_len) and inputs.dtype == torch.int64
    assert 0 <= inputs.min() and inputs.max() < PASSKEY_VOCAB
    labelled = targets != IGNORE_INDEX
    assert not labelled[:, : seq_len - k].any() and labelled[:, seq_len - k:].all()
    digits = targets[:, seq_len - k:]  # (B, k)
    assert ((0 <= digits) & (digits < 10)).all()
    assert (inputs[:, seq_len - k] == QUERY).all()
    assert torch.equal(inputs[:, seq_len - k + 1:], digits[:, :-1])  # teacher forcing of the answer
    mark = inputs == KEY_MARK
    assert (mark.sum(1) == 1).all()
    start = mark.float().argmax(1)  # (B,)
    last_start = seq_len - 2 * k - 1
    if depth is not None:
        assert (start == int(depth * last_start + 0.5)).all()
    assert (start <= last_start).all()
    needle = inputs.gather(1, start.unsqueeze(1) + 1 + torch.arange(k))  # (B, k)
    assert torch.equal(needle, digits)
    # everything else is the periodic filler
    filler = torch.ones_like(mark)
    filler.scatter_(1, start.unsqueeze(1) + torch.arange(k + 1), False)
    filler[:, seq_len - k:] = False
    expected = (12 + torch.arange(seq_len) % 8).expand(16, -1)
    assert torch.equal(inputs[filler], expected[filler])


def test_seed_reproducible_and_depths_cover_range():
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    a, b = passkey_batch(2000, seq_len=40, generator=g()), passkey_batch(2000, seq_len=40, generator=g())
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    start = (a[0] == KEY_MARK).float().argmax(1)
    counts = torch.bincount(start, minlength=32)
    assert counts.numel() == 32 and counts.min() > 30  # uniform over 0 .. 31 (62.5 expected each)


@pytest.mark.parametrize("kwargs,err", [(dict(seq_len=8), ValueError), (dict(seq_len=64, depth=1.5), ValueError),
                                        (dict(seq_len=64, depth="mid"), TypeError)], ids=["short", "depth>1", "str"])
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        passkey_batch(2, generator=torch.Generator(), **kwargs)
