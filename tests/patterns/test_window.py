"""SlidingWindow: the cropped LLM band, its exact schedule and density."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.patterns import Causal, SlidingWindow

HYPOTHESIS = settings(max_examples=80, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_hand_example():
    # window 1 on 5 tokens: the band is cropped at both borders
    expected = [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]
    m = SlidingWindow(1).dense_mask(5, 5)[0]
    assert [torch.nonzero(row)[:, 0].tolist() for row in m] == expected
    # causal window 2: the query and the two keys before it
    m = SlidingWindow(2, causal=True).dense_mask(5, 5)[0]
    assert [torch.nonzero(row)[:, 0].tolist() for row in m] == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_window_zero_is_the_diagonal_and_a_wide_causal_window_is_causal():
    assert torch.equal(SlidingWindow(0).dense_mask(7, 7)[0], torch.eye(7, dtype=torch.bool))
    assert torch.equal(SlidingWindow(10, causal=True).dense_mask(7, 9), Causal().dense_mask(7, 9))


@HYPOTHESIS
@given(n_q=st.integers(1, 120), n_kv=st.integers(1, 120), window=st.integers(0, 70), causal=st.booleans(),
       tile_q=st.integers(1, 33), tile_kv=st.integers(1, 33))
def test_schedule_and_density(n_q, n_kv, window, causal, tile_q, tile_kv, schedule_exact):
    p = SlidingWindow(window, causal)
    s = p.tile_schedule(n_q, n_kv, tile_q, tile_kv)
    assert s.q_perm is None and s.kv_perm is None
    schedule_exact(p, s)
    assert p.density(n_q, n_kv) == pytest.approx(p.dense_mask(n_q, n_kv).double().mean().item(), abs=1e-15)


def test_mask_broadcasts():
    p = SlidingWindow(3, causal=True)
    q, kv = torch.arange(6).view(2, 3, 1), torch.arange(8).view(1, 1, 8)
    assert torch.equal(p.mask(q, kv).reshape(6, 8), p.dense_mask(6, 8)[0])


@pytest.mark.parametrize("kwargs, fragment", [(dict(window=-1), "window=-1"), (dict(window=2.0), "window=2.0"),
                                              (dict(window=2, causal="yes"), "causal='yes'")],
                         ids=["negative", "float", "causal-not-bool"])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SlidingWindow(**kwargs)
