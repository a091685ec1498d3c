"""Byte-level pydoc corpus: deterministic disjoint split, shifted targets, evaluation windows."""

import pytest
import torch

from headwise.arena.data import text_batch, text_corpus, text_windows


def test_split_is_deterministic_and_partitions_the_corpus():
    train, val = text_corpus("train"), text_corpus("val")
    assert train.dtype == val.dtype == torch.uint8
    assert torch.equal(train, text_corpus("train"))
    n = train.numel() + val.numel()
    assert n > 100_000 and val.numel() == int(n * 0.1)
    from pydoc_data.topics import topics
    whole = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    assert bytes(train.tolist()) + bytes(val.tolist()) == whole


def test_batch_windows_are_shifted_copies():
    data = torch.arange(200, dtype=torch.uint8)
    inputs, targets = text_batch(data, 8, seq_len=32, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (inputs.diff(dim=1) == 1).all() and (targets[:, -1] <= 199).all()
    again = text_batch(data, 8, seq_len=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again[0])


def test_eval_windows_cover_every_byte_once():
    data = torch.arange(103, dtype=torch.uint8)
    inputs, targets = text_windows(data, seq_len=10)
    assert inputs.shape == (10, 10)
    assert targets.reshape(-1).tolist() == list(range(1, 101))
    assert torch.equal(inputs.reshape(-1), torch.arange(100))


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        text_corpus("test")
    with pytest.raises(ValueError, match="fewer than"):
        text_windows(torch.zeros(5, dtype=torch.uint8), seq_len=5)
    with pytest.raises(TypeError):
        text_batch(torch.zeros(50, dtype=torch.uint8), 2, seq_len=4, generator=0)
