"""SinkWindow (MoA's per-head rule, StreamingLLM's window): mask, exact schedule, density, engine vs reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headwise
from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Pattern, PerHead, SinkWindow, SlidingWindow

HYPOTHESIS = settings(max_examples=80, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_hand_example():
    rows = [r.nonzero()[:, 0].tolist() for r in SinkWindow(span=2, sinks=2).dense_mask(6, 6)[0]]
    assert rows == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 3, 4], [0, 1, 4, 5]]


def test_is_the_union_of_a_causal_window_and_causal_sinks():
    for span, sinks, n_q, n_kv in [(1, 0, 9, 9), (3, 2, 17, 11), (5, 9, 12, 20), (40, 3, 30, 30)]:
        sink_keys = torch.arange(n_kv) < sinks
        expected = SlidingWindow(span - 1, causal=True).dense_mask(n_q, n_kv) | (Causal().dense_mask(n_q, n_kv) & sink_keys)
        assert torch.equal(SinkWindow(span, sinks).dense_mask(n_q, n_kv), expected)


def test_span_at_least_n_is_causal():
    assert torch.equal(SinkWindow(50, 3).dense_mask(50, 50), Causal().dense_mask(50, 50))


@HYPOTHESIS
@given(n_q=st.integers(1, 130), n_kv=st.integers(1, 130), span=st.integers(1, 80), sinks=st.integers(0, 40),
       tile_q=st.integers(1, 33), tile_kv=st.integers(1, 33))
def test_schedule_and_density_are_exact(n_q, n_kv, span, sinks, tile_q, tile_kv, schedule_exact):
    p = SinkWindow(span, sinks)
    schedule_exact(p, p.tile_schedule(n_q, n_kv, tile_q, tile_kv))
    m = p.dense_mask(n_q, n_kv)[0]
    assert torch.equal(p.row_counts(n_q, n_kv), m.sum(1))
    assert p.density(n_q, n_kv) == pytest.approx(m.double().mean().item(), abs=1e-15)
    assert p.density(n_q, n_kv) == pytest.approx(Pattern.density(p, n_q, n_kv), abs=1e-15)


def test_per_head_schedule_is_exact(schedule_exact):
    p = PerHead([SinkWindow(s, k) for s, k in [(1, 0), (7, 4), (30, 0), (100, 64)]])
    for h in range(4):
        schedule_exact(p, p.tile_schedule(150, 150, 16, 32, head=h), head=h)


@pytest.mark.parametrize("N", [1, 63, 200], ids=lambda n: f"N{n}")
def test_engine_matches_reference_forward_and_grad(N):
    torch.manual_seed(0)
    pattern = PerHead([SinkWindow(s, k) for s, k in [(1, 0), (5, 3), (37, 0), (N, 1)]])
    B, H, D = 2, 4, 9
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = headwise.attention(q, k, v, pattern, backend="blocksparse")
    ref, _ = naive_attention(q, k, v, pattern)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kwargs, fragment", [(dict(span=0), "span=0"), (dict(span=2.5), "span=2.5"),
                                              (dict(span=3, sinks=-1), "sinks=-1"), (dict(span=True), "span=True")],
                         ids=["span-zero", "span-float", "sinks-negative", "span-bool"])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SinkWindow(**kwargs)
