"""Byte-level text from CPython's own documentation topics (``pydoc_data.topics``), shipped with Python.

The corpus is the ~80 help topics of the standard library's ``pydoc_data`` (about 0.46 MB of English prose with
code; it varies a little between Python versions): topics sorted by name, joined by a blank line, UTF-8 encoded.
Deterministic split: the last ``val_fraction`` (default 10%) of those bytes is held out as ``"val"`` (the last
topics in alphabetical order; the cut may fall inside one topic), the rest is ``"train"``. Vocabulary: the 256
byte values. Report bits per byte = mean cross-entropy (nats) / ln 2.

>>> train = text_corpus("train")                                       # uint8 [T]
>>> g = torch.Generator().manual_seed(0)
>>> inputs, targets = text_batch(train, 16, seq_len=128, generator=g)  # int64 [16, 128], targets shifted by one
>>> val_in, val_tg = text_windows(text_corpus("val"), seq_len=128)     # every held-out byte predicted once
"""

from __future__ import annotations

import numpy as np
import torch

from headwise.arena.data._common import check_generator
from headwise.checks import check_positive_int

__all__ = ["text_corpus", "text_batch", "text_windows", "TEXT_VOCAB"]

TEXT_VOCAB = 256  # byte values


def text_corpus(split: str = "train", *, val_fraction: float = 0.1) -> torch.Tensor:
    """The bytes of one split (``"train"`` or ``"val"``) as a uint8 tensor ``[T]``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split=}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction=}")
    from pydoc_data.topics import topics

    data = np.frombuffer("\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8"), dtype=np.uint8)
    cut = len(data) - int(len(data) * val_fraction)
    part = data[:cut] if split == "train" else data[cut:]
    return torch.from_numpy(part.copy())


def _check_data(data: torch.Tensor, seq_len: int) -> None:
    if not isinstance(data, torch.Tensor) or data.dim() != 1:
        raise ValueError(f"data must be a 1-D byte tensor, got {getattr(data, 'shape', type(data).__name__)}")
    if data.numel() < seq_len + 1:
        raise ValueError(f"data holds {data.numel()} bytes, fewer than {seq_len=} + 1")


def text_batch(data: torch.Tensor, batch: int, *, seq_len: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``inputs = data[s : s + L]``, ``targets = data[s + 1 : s + L + 1]``, int64 ``[batch, L]``."""
    check_positive_int("batch", batch)
    check_positive_int("seq_len", seq_len)
    check_generator(generator)
    _check_data(data, seq_len)
    starts = torch.randint(0, data.numel() - seq_len, (batch, 1), generator=generator)  # (B, 1)
    idx = starts + torch.arange(seq_len + 1)  # (B, L+1)
    window = data.long()[idx]  # (B, L+1)
    return window[:, :-1], window[:, 1:]


def text_windows(data: torch.Tensor, *, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping windows for evaluation, int64 ``[N, L]`` each; the ragged tail is dropped
    (``N = (T - 1) // L``), so every byte from 1 to ``N L`` is predicted exactly once."""
    check_positive_int("seq_len", seq_len)
    _check_data(data, seq_len)
    n = (data.numel() - 1) // seq_len
    flat = data.long()
    inputs = flat[: n * seq_len].reshape(n, seq_len)  # (N, L)
    targets = flat[1: n * seq_len + 1].reshape(n, seq_len)  # (N, L)
    return inputs, targets
