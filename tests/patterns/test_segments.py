"""Segments (attention within equal labels) and KeyMask (key padding): predicate, schedule, density, errors."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.patterns import KeyMask, Neighborhood, Segments

HYPOTHESIS = settings(max_examples=80, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
labels_st = st.lists(st.integers(-2, 4), min_size=1, max_size=120)


def test_hand_example():
    p = Segments([7, 7, 3, 3, 3, 7])
    m = p.dense_mask(6, 6)[0]
    assert [torch.nonzero(row)[:, 0].tolist() for row in m] == [[0, 1, 5], [0, 1, 5], [2, 3, 4], [2, 3, 4],
                                                                  [2, 3, 4], [0, 1, 5]]
    assert p.density(6, 6) == (3 * 3 + 3 * 3) / 36
    # cross labels: query label 5 has no key and is fully masked
    p = Segments([1, 5, 2], kv_labels=[2, 1, 1, 2])
    assert p.dense_mask(3, 4)[0].int().tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]]


@HYPOTHESIS
@given(labels=labels_st, kv_labels=st.none() | labels_st, tile_q=st.integers(1, 20), tile_kv=st.integers(1, 20))
def test_schedule_and_density(labels, kv_labels, tile_q, tile_kv, schedule_exact):
    p = Segments(labels, kv_labels)
    n_q, n_kv = len(labels), len(labels if kv_labels is None else kv_labels)
    s = p.tile_schedule(n_q, n_kv, tile_q, tile_kv)
    schedule_exact(p, s)
    assert p.density(n_q, n_kv) == pytest.approx(p.dense_mask(n_q, n_kv).double().mean().item(), abs=1e-15)
    if s.q_perm is not None:
        ordered = torch.tensor(labels)[s.q_perm]
        assert (ordered.diff() >= 0).all()  # grouped by a sort of the labels
        same = ordered.diff() == 0
        assert (s.q_perm.diff()[same] > 0).all()  # stable: original order within a label


def test_grouped_labels_keep_their_order():
    s = Segments([3, 3, 1, 1, 1, 2]).tile_schedule(6, 6, 2, 2)
    assert s.q_perm is None and s.kv_perm is None
    s = Segments([3, 1, 3, 2]).tile_schedule(4, 4, 2, 2)
    assert s.q_perm.tolist() == [1, 3, 0, 2] and s.kv_perm is s.q_perm


def test_packed_documents_are_block_diagonal_tiles():
    # four documents of 64 tokens: every visited tile is full and on the diagonal
    p = Segments(torch.arange(4).repeat_interleave(64))
    s = p.tile_schedule(256, 256, 64, 64)
    assert s.kv_tiles.tolist() == [[0], [1], [2], [3]] and s.full.all()


@HYPOTHESIS
@given(keep=st.lists(st.booleans(), min_size=1, max_size=100), n_q=st.integers(1, 50), tile_q=st.integers(1, 20),
       tile_kv=st.integers(1, 20))
def test_key_mask(keep, n_q, tile_q, tile_kv, schedule_exact):
    p = KeyMask(keep)
    n_kv = len(keep)
    assert torch.equal(p.dense_mask(n_q, n_kv)[0], torch.tensor(keep)[None, :].expand(n_q, n_kv))
    assert p.density(n_q, n_kv) == pytest.approx(sum(keep) / n_kv, abs=1e-15)
    schedule_exact(p, p.tile_schedule(n_q, n_kv, tile_q, tile_kv))


def test_key_padding_by_intersection(schedule_exact):
    keep = torch.arange(36) < 30  # the last 6 keys are padding
    p = Neighborhood((6, 6), 3) & KeyMask(keep)
    m = p.dense_mask(36, 36)[0]
    assert torch.equal(m, Neighborhood((6, 6), 3).dense_mask(36, 36)[0] & keep)
    schedule_exact(p, p.tile_schedule(36, 36, 8, 8))


def test_mask_broadcasts_and_equality():
    p = Segments([0, 1, 1, 0, 2])
    q, kv = torch.arange(5).view(5, 1, 1), torch.arange(5).view(1, 1, 5)
    assert torch.equal(p.mask(q, kv)[:, 0], p.dense_mask(5, 5)[0])
    assert p == Segments(torch.tensor([0, 1, 1, 0, 2])) and hash(p) == hash(Segments([0, 1, 1, 0, 2]))
    assert p != Segments([0, 1, 1, 0, 2], kv_labels=[0, 1, 1, 0, 3])
    assert KeyMask([True, False]) == KeyMask(torch.tensor([True, False]))
    assert "Segments([0, 1, 1, 0, 2])" == repr(p)


@pytest.mark.parametrize(
    "build, fragment",
    [
        (lambda: Segments([[0, 1], [1, 0]]), "labels must be a non-empty 1-D int"),
        (lambda: Segments([0.5, 1.0]), "labels"),
        (lambda: Segments([]), "labels"),
        (lambda: Segments([0, 1], kv_labels=[True, False]), "kv_labels"),
        (lambda: Segments([0, 1]).dense_mask(3, 2), "n_q=3"),
        (lambda: Segments([0, 1], kv_labels=[0, 1, 1]).tile_schedule(2, 2), "n_kv=2"),
        (lambda: KeyMask([0, 1]), "keep must be a non-empty 1-D bool"),
        (lambda: KeyMask([True]).dense_mask(4, 2), "n_kv=2"),
    ],
    ids=["labels-2d", "labels-float", "labels-empty", "kv-labels-bool", "n_q-mismatch", "n_kv-mismatch",
         "keep-not-bool", "keep-length"],
)
def test_bad_arguments(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build()
