"""MoAPlan: spans follow alpha + beta N at every length, densities, JSON round trip, clear errors."""

import json
import math

import pytest

from headwise.patterns.moa_plan import MoAPlan, causal_density, span_at
from headwise.patterns import PerHead, SinkWindow

PLAN = MoAPlan(alphas=[[16, 0, -8, 3.5], [0, 100, 2, 0]], betas=[[0, 0.5, 0.25, 0.125], [1, 0, 0.75, 0.01]], sinks=3)


@pytest.mark.parametrize("n", [1, 7, 64, 333, 4096], ids=lambda n: f"N{n}")
def test_spans_follow_the_plan(n):
    for layer in range(PLAN.layers):
        spans = PLAN.spans(layer, n)
        for h, s in enumerate(spans):
            a, b = PLAN.alphas[layer][h], PLAN.betas[layer][h]
            assert s == min(max(math.floor(a + b * n), 1), n)
        # the pattern is the per-head window: each query row attends exactly its span (plus sinks before it)
        mask = PLAN.pattern(layer, n).dense_mask(n, n) if n <= 333 else None
        if mask is not None:
            for h, s in enumerate(spans):
                i = n - 1
                keys = mask[h, i].nonzero()[:, 0]
                window = set(range(max(0, i - s + 1), i + 1))
                assert set(keys.tolist()) == window | set(range(min(3, i + 1)))


def test_pattern_is_per_head_sink_windows():
    assert PLAN.pattern(1, 200) == PerHead([SinkWindow(200, 3), SinkWindow(100, 3), SinkWindow(152, 3), SinkWindow(2, 3)])


def test_span_rounding_and_clamping():
    assert span_at(-100, 0.5, 64) == 1  # never below the query itself
    assert span_at(10, 1.0, 64) == 64  # never beyond the causal context
    assert span_at(0.9, 0.5, 5) == 3  # floor(3.4)


def test_density_is_relative_to_causal_pairs():
    n = 50
    full = MoAPlan.uniform(2, 3, alpha=0, beta=1)
    assert full.density(n) == pytest.approx(1.0)
    p = MoAPlan.uniform(1, 2, alpha=5, beta=0, sinks=2)
    attended = SinkWindow(5, 2).dense_mask(n, n).sum().item()
    assert p.density(n) == pytest.approx(attended / (n * (n + 1) / 2))
    assert causal_density(SinkWindow(5, 2), n) == pytest.approx(p.density(n, layer=0))


def test_json_round_trip(tmp_path):
    plan = MoAPlan(alphas=PLAN.alphas, betas=PLAN.betas, sinks=3, meta={"budget": 0.25, "lengths": [64, 128]})
    path = tmp_path / "plan.json"
    plan.save(path)
    again = MoAPlan.load(path)
    assert again == plan and again.meta == plan.meta
    assert json.loads(path.read_text())["format"] == "headwise.moa.plan/1"
    for n in (9, 100):
        assert again.pattern(0, n) == plan.pattern(0, n)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(alphas=[[1, 2]], betas=[[0.5]]), "same \\[layers\\]\\[heads\\] shape"),
    (dict(alphas=[[1, 2], [3]], betas=[[0, 0], [0]]), "same number of heads"),
    (dict(alphas=[], betas=[]), "alphas must be a non-empty"),
    (dict(alphas=[[1, float("nan")]], betas=[[0, 0]]), r"alphas\[0\]\[1\] must be a finite number"),
    (dict(alphas=[[1, "2"]], betas=[[0, 0]]), r"alphas\[0\]\[1\]"),
    (dict(alphas=[[1]], betas=[[True]]), r"betas\[0\]\[0\]"),
    (dict(alphas=[[1]], betas=[[0]], sinks=-2), "sinks=-2"),
], ids=["shape", "ragged", "empty", "nan", "string", "bool", "sinks"])
def test_bad_plans_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        MoAPlan(**kwargs)


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        MoAPlan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        MoAPlan.load(bad)
    bad.write_text(json.dumps({"alphas": [[1]], "betas": [[0]], "sinks": 0}))
    with pytest.raises(ValueError, match="not an MoA plan"):
        MoAPlan.load(bad)
    d = PLAN.to_dict()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        MoAPlan.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match=r"misses the key\(s\) \['betas'\]"):
        MoAPlan.from_dict({k: v for k, v in d.items() if k != "betas"})
    with pytest.raises(ValueError, match="layer=2"):
        PLAN.spans(2, 10)
    with pytest.raises(ValueError, match="n=0"):
        PLAN.spans(0, 0)
