"""ListOps: labels equal an independent stack evaluator of the token string; lengths, tokens, seeding."""

import numpy as np
import pytest
import torch

from headwise.arena.data import (LISTOPS_QUICK, LISTOPS_TOKENS, LISTOPS_VOCAB, listops_batch, listops_tokens,
                                 listops_value)


def _stack_eval(ids):
    """Evaluate a token-id sequence left to right with a stack (no tree), LRA's semantics via numpy."""
    words = [LISTOPS_TOKENS[i] for i in ids if i != 0]
    stack = []
    for w in words:
        if w.startswith("["):
            stack.append([w])
        elif w == "]":
            op, *args = stack.pop()
            value = {"[MIN": min, "[MAX": max, "[SM": lambda a: int(np.sum(a)) % 10,
                     "[MED": lambda a: int(np.median(a))}[op](args)
            if not stack:
                return value
            stack[-1].append(value)
        else:
            if not stack:
                return int(w)
            stack[-1].append(int(w))
    raise AssertionError("unbalanced expression")


def test_hand_written_expressions():
    tree = ("[MAX", [2, 9, ("[MIN", [4, 7]), 0])
    assert listops_value(tree) == 9 and listops_tokens(tree) == [12, 3, 10, 11, 5, 8, 15, 1, 15]
    assert listops_value(("[MED", [1, 2, 3, 9])) == 2  # int(np.median) = int(2.5)
    assert listops_value(("[SM", [7, 8, ("[MED", [5, 1, 9])])) == 0  # (7 + 8 + 5) % 10


@pytest.mark.parametrize("cfg", [LISTOPS_QUICK, dict(max_depth=4, max_args=10, min_len=10, max_len=60)],
                         ids=["quick", "depth4"])
def test_labels_match_independent_evaluator(cfg):
    tokens, labels = listops_batch(300, **cfg, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (300, cfg["max_len"]) and labels.shape == (300,) and tokens.dtype == torch.int64
    assert 0 <= tokens.min() and tokens.max() < LISTOPS_VOCAB
    lengths = (tokens != 0).sum(1)
    assert (lengths > cfg["min_len"]).all() and (lengths < cfg["max_len"]).all()
    for row, label in zip(tokens.tolist(), labels.tolist()):
        n = sum(1 for t in row if t != 0)
        assert all(t == 0 for t in row[n:])  # right-padded
        assert _stack_eval(row) == label
    assert len(set(labels.tolist())) == 10  # every class occurs in 300 draws


def test_depth_is_limited():
    tokens, _ = listops_batch(200, max_depth=3, max_args=6, min_len=5, max_len=40,
                              generator=torch.Generator().manual_seed(1))
    opens = ((tokens >= 11) & (tokens <= 14)).long() - (tokens == 15).long()
    assert opens.cumsum(1).max() <= 2  # operators live at depths 1 .. max_depth - 1


def test_seed_reproducible():
    a = listops_batch(20, **LISTOPS_QUICK, generator=torch.Generator().manual_seed(3))
    b = listops_batch(20, **LISTOPS_QUICK, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [dict(max_args=1), dict(min_len=10, max_len=11), dict(max_depth=1)],
                         ids=["args1", "empty-range", "depth1"])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        listops_batch(2, generator=torch.Generator(), **kwargs)
