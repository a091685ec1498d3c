"""ListOps from the Long Range Arena, generated offline.

Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers" (2021), after Nangia & Bowman (2018). The
generator logic follows LRA's ``lra_benchmarks/data/listops.py`` (ported, not copied):

* ``tree(depth)``: below ``max_depth`` a node is an operator with probability ``VALUE_P = 0.25`` (else a digit
  ``0 .. 9``); at ``depth == max_depth`` it is always a digit. An operator is one of MIN, MAX, MED, SM (sum mod
  10), uniformly, applied to ``randint(2, max_args)`` (inclusive) subtrees at ``depth + 1``. The root has depth 1.
* ``length`` counts operator, digit and ``]`` tokens (an operator node costs 2 plus its children); trees are drawn
  until ``min_len < length < max_len`` (strict, as in LRA). LRA also de-duplicates its fixed train/val/test sets;
  fresh batches here do not.
* values: MIN, MAX, SM = ``sum % 10``, MED = ``int(np.median(args))`` (the mean of the two middle values,
  truncated, when the count is even), exactly LRA's ``to_value``.
* tokens: LRA's string ``( ( [MAX 2 ) 9 ... ] )`` without the parentheses, keeping ``]`` (as the widely used
  S4/state-spaces ListOps loader does; LRA's own tfds tokenizer drops every non-alphanumeric symbol, ``]``
  included). Ids in ``LISTOPS_TOKENS``: ``0`` pad, ``1 .. 10`` digits 0-9, ``11 .. 14`` [MIN [MAX [MED [SM,
  ``15`` ``]``. Each row is right-padded with 0 to ``max_len`` (a fixed shape; LRA pads to 2000).

LRA defaults: ``max_depth=10, max_args=10, min_len=500, max_len=2000``. ``LISTOPS_QUICK`` is a short preset for
CPU runs (lengths 33..127).

>>> g = torch.Generator().manual_seed(0)
>>> tokens, labels = listops_batch(8, **LISTOPS_QUICK, generator=g)   # int64 [8, 128], int64 [8] in 0..9
"""

from __future__ import annotations

import random

import torch

from headwise.arena.data._common import check_generator, python_seed
from headwise.checks import check_positive_int

__all__ = ["listops_batch", "listops_tree", "listops_tokens", "listops_value", "LISTOPS_TOKENS", "LISTOPS_VOCAB",
           "LISTOPS_QUICK", "LISTOPS_LRA"]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_TOKENS = ("<pad>", *map(str, range(10)), *OPERATORS, "]")  # id -> token
LISTOPS_VOCAB = len(LISTOPS_TOKENS)  # 16
PAD, END = 0, LISTOPS_TOKENS.index("]")
VALUE_P = 0.25  # probability that a node above max_depth is an operator (LRA's name for it)
LISTOPS_LRA = dict(max_depth=10, max_args=10, min_len=500, max_len=2000)  # the benchmark's settings
LISTOPS_QUICK = dict(max_depth=6, max_args=5, min_len=32, max_len=128)  # short preset for CPU runs

def listops_tree(rng: random.Random, *, max_depth: int = 10, max_args: int = 10, depth: int = 1):
    """One random expression tree and its token length: ``(tree, length)`` (LRA's ``generate_tree``).

    A tree is a digit ``int`` or ``(operator, [arguments])`` with an operator from ``"[MIN" "[MAX" "[MED" "[SM"``.
    """
    if depth >= max_depth or rng.random() > VALUE_P:
        return rng.choice(range(10)), 1
    args, length = [], 2
    for _ in range(rng.randint(2, max_args)):
        sub, sub_len = listops_tree(rng, max_depth=max_depth, max_args=max_args, depth=depth + 1)
        args.append(sub)
        length += sub_len
    return (rng.choice(OPERATORS), args), length


def listops_value(tree) -> int:
    """The value ``0 .. 9`` of an expression tree."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = [listops_value(a) for a in args]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[SM":
        return sum(vals) % 10
    s = sorted(vals)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2  # int(np.median) for non-negative ints


def listops_tokens(tree) -> list[int]:
    """Token ids of an expression (prefix order, parentheses dropped, ``]`` closes each operator)."""
    if isinstance(tree, int):
        return [tree + 1]
    op, args = tree
    out = [LISTOPS_TOKENS.index(op)]
    for a in args:
        out += listops_tokens(a)
    return out + [END]


def listops_batch(batch: int, *, max_depth: int = 10, max_args: int = 10, min_len: int = 500, max_len: int = 2000,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` fresh expressions with ``min_len < length < max_len``: ``(tokens [batch, max_len] int64,
    0-padded; labels [batch] int64 in 0..9)``. Python-side sampling, seeded from ``generator``."""
    for name, value in (("batch", batch), ("max_depth", max_depth), ("max_args", max_args), ("max_len", max_len)):
        check_positive_int(name, value)
    if isinstance(min_len, bool) or not isinstance(min_len, int) or min_len < 0:
        raise ValueError(f"min_len must be an int >= 0, got {min_len=}")
    if max_args < 2:
        raise ValueError(f"max_args must be >= 2 (operators take 2 .. max_args arguments), got {max_args=}")
    if max_len - min_len < 2:
        raise ValueError(f"need min_len < length < max_len to allow a length, got {min_len=} {max_len=}")
    if max_depth < 2 and min_len >= 1:
        raise ValueError(f"max_depth={max_depth} only yields single digits (length 1), but {min_len=} excludes them")
    check_generator(generator)
    rng = random.Random(python_seed(generator))
    tokens = torch.full((batch, max_len), PAD, dtype=torch.int64)  # (B, max_len)
    labels = torch.empty(batch, dtype=torch.int64)  # (B,)
    for row in range(batch):
        while True:
            tree, length = listops_tree(rng, max_depth=max_depth, max_args=max_args)
            if min_len < length < max_len:
                break
        ids = listops_tokens(tree)
        tokens[row, : len(ids)] = torch.tensor(ids)
        labels[row] = listops_value(tree)
    return tokens, labels
