"""MQAR generator: layout, label positions, key/value disjointness, seeding, Zoology's power-law placement."""

import pytest
import torch
from scipy.stats import chi2

from headwise.arena.data import IGNORE_INDEX, mqar_batch, mqar_gap_probs, mqar_mixed_batch


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _query_slots(inputs, targets, num_pairs):
    """Slot g_i (query position = 2P + 2 g_i) of each pair i, recovered from the batch: ``[B, P]``."""
    context = 2 * num_pairs
    keys = inputs[:, 0:context:2]  # (B, P)
    even_in = inputs[:, context::2]  # (B, S)
    labelled = targets[:, context::2] != IGNORE_INDEX  # (B, S)
    hits = (even_in.unsqueeze(1) == keys.unsqueeze(2)) & labelled.unsqueeze(1)  # (B, P, S)
    assert (hits.sum(-1) == 1).all(), "every key is queried exactly once"
    return hits.float().argmax(-1)


@pytest.mark.parametrize("pairs,vocab,seq_len", [(4, 256, 64), (8, 256, 64), (16, 256, 64), (1, 8, 4), (3, 100, 30)],
                         ids=lambda v: str(v))
def test_layout_and_labels(pairs, vocab, seq_len):
    inputs, targets = mqar_batch(64, num_pairs=pairs, vocab=vocab, seq_len=seq_len, generator=_gen())
    assert inputs.shape == targets.shape == (64, seq_len)
    assert inputs.dtype == targets.dtype == torch.int64
    assert 0 <= inputs.min() and inputs.max() < vocab
    half, context = vocab // 2, 2 * pairs
    keys, values = inputs[:, 0:context:2], inputs[:, 1:context:2]
    assert ((1 <= keys) & (keys < half)).all() and ((half <= values) & (values < vocab)).all()
    # no key (or value) collision within an example
    assert (keys.sort(1).values.diff(dim=1) > 0).all() and (values.sort(1).values.diff(dim=1) > 0).all()
    labelled = targets != IGNORE_INDEX
    assert (labelled.sum(1) == pairs).all()
    assert not labelled[:, :context].any() and not labelled[:, context + 1::2].any()  # even query offsets only
    slots = _query_slots(inputs, targets, pairs)
    pos = context + 2 * slots  # (B, P)
    assert torch.equal(targets.gather(1, pos), values)  # label at the query of k_i is v_i
    assert torch.equal(inputs.gather(1, pos), keys)


def test_no_random_fill_leaves_zeros():
    inputs, targets = mqar_batch(8, num_pairs=4, vocab=64, seq_len=32, random_fill=False, generator=_gen())
    filler = torch.ones_like(inputs, dtype=torch.bool)
    filler[:, :8] = False
    filler &= targets == IGNORE_INDEX
    assert (inputs[filler] == 0).all() and (inputs[~filler] != 0).all()


def test_seed_reproducible_and_fresh():
    a = mqar_batch(16, generator=_gen(3))
    b = mqar_batch(16, generator=_gen(3))
    g = _gen(3)
    c1, c2 = mqar_batch(16, generator=g), mqar_batch(16, generator=g)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a[0], c1[0]) and not torch.equal(c1[0], c2[0])


def test_power_law_placement_matches_definition():
    """First pair's slot ~ p exactly; second pair's slot ~ successive sampling P(g1=j) = sum_i p_i p_j / (1 - p_i)."""
    pairs, seq_len, n = 8, 64, 40_000
    inputs, targets = mqar_batch(n, num_pairs=pairs, seq_len=seq_len, generator=_gen(7))
    slots = _query_slots(inputs, targets, pairs)
    p = mqar_gap_probs((seq_len - 2 * pairs) // 2)  # (S,)
    second = p * ((p / (1 - p)).sum() - p / (1 - p))
    assert torch.isclose(second.sum(), torch.tensor(1.0, dtype=torch.float64))
    for draw, expected in ((0, p), (1, second)):
        counts = torch.bincount(slots[:, draw], minlength=p.numel()).double()
        stat = ((counts - n * expected) ** 2 / (n * expected)).sum().item()
        assert chi2.sf(stat, p.numel() - 1) > 1e-3, f"draw {draw}: chi2={stat:.1f}"
    # the law is strongly skewed at Zoology's power_a=0.01: slot 0 alone carries ~26% of the first draw
    assert p[0] > 0.25 and p[0] > 10 * p[-1]


def test_power_a_one_is_uniform():
    p = mqar_gap_probs(10, power_a=1.0)
    assert torch.allclose(p, torch.full((10,), 0.1, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,err", [
    (dict(seq_len=63), ValueError), (dict(num_pairs=17, seq_len=64), ValueError),
    (dict(num_pairs=4, vocab=8, seq_len=16), ValueError), (dict(batch=0), ValueError),
    (dict(num_pairs=2.0), TypeError), (dict(generator=None), TypeError), (dict(power_a=0.0), ValueError),
], ids=["odd-len", "too-many-pairs", "small-vocab", "batch0", "float-pairs", "no-generator", "power0"])
def test_bad_arguments(kwargs, err):
    kw = dict(batch=2, generator=_gen())
    kw.update(kwargs)
    batch = kw.pop("batch")
    with pytest.raises(err):
        mqar_batch(batch, **kw)


def test_mixed_batch_blocks_and_counts():
    inputs, targets, counts = mqar_mixed_batch(10, pairs=(4, 8, 16), generator=_gen(9))
    assert inputs.shape == targets.shape == (10, 64) and counts.tolist() == [4] * 4 + [8] * 3 + [16] * 3
    assert torch.equal((targets != IGNORE_INDEX).sum(1), counts)
    # the same stream as calling mqar_batch block by block
    g = _gen(9)
    blocks = [mqar_batch(n, num_pairs=p, generator=g) for n, p in ((4, 4), (3, 8), (3, 16))]
    assert torch.equal(inputs, torch.cat([b[0] for b in blocks]))
    assert torch.equal(targets, torch.cat([b[1] for b in blocks]))
    with pytest.raises(ValueError):
        mqar_mixed_batch(2, pairs=(4, 8, 16), generator=_gen())
    with pytest.raises(TypeError):
        mqar_mixed_batch(4, pairs=8, generator=_gen())
