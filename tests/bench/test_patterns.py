"""The pattern benchmark harness: case definitions, row fields, peers' skip notes, rendering, timing and memory.

Speed is never asserted here: only that the harness measures what it says and reports it faithfully.
"""

import importlib.util
import math
import time

import pytest
import torch

from headwise.bench.patterns import (
    CASES,
    PEERS,
    QUICK_CASES,
    BenchCase,
    bench_case,
    run_pattern_bench,
    select_cases,
    to_markdown,
)
from headwise.bench.timing import peak_memory_mb, time_call
from headwise.patterns import Causal, Neighborhood

# the issue's cases, fp32, B=1, H=8, D=64
ISSUE_CASES = {
    "1d-neighborhood": ((16384,), (513,), (1,), (False,)),
    "1d-causal-window": ((16384,), (513,), (1,), (True,)),
    "2d-neighborhood": ((128, 128), (17, 17), (1, 1), (False, False)),
    "3d-neighborhood": ((16, 32, 32), (5, 9, 9), (1, 1, 1), (False, False, False)),
    "1d-blocked": ((16384,), (512,), (512,), (False,)),
}


def test_cases_are_the_issues():
    assert [c.name for c in CASES] == list(ISSUE_CASES)
    for case in CASES:
        pattern = case.build_pattern()
        assert isinstance(pattern, Neighborhood)
        grid, kernel, stride, causal = ISSUE_CASES[case.name]
        assert (pattern.grid, pattern.kernel_size, pattern.stride, pattern.causal) == (grid, kernel, stride, causal)
        assert pattern.dilation == (1,) * len(grid)
        assert (case.batch, case.heads, case.head_dim, case.n) == (1, 8, 64, 16384)


def test_quick_cases_mirror_the_full_ones_at_a_quarter_of_the_tokens():
    assert [c.name for c in QUICK_CASES] == [c.name for c in CASES]
    for quick in QUICK_CASES:
        pattern = quick.build_pattern()
        assert quick.n <= 4096
        assert 0.01 < pattern.density(quick.n, quick.n) < 0.05  # sparse like the full cases (1.8 % .. 3.1 %)


def test_select_cases_keeps_order_and_rejects_unknown_names():
    assert [c.name for c in select_cases(CASES, ["1d-blocked", "2d-neighborhood"])] == ["1d-blocked", "2d-neighborhood"]
    assert select_cases(CASES, None) == list(CASES)
    with pytest.raises(ValueError, match="unknown benchmark case 'nope'; valid: 1d-neighborhood, "):
        select_cases(CASES, ["nope"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=(0,)), "grid"), (dict(grid=()), "grid"), (dict(heads=0), "heads"), (dict(head_dim=2.5), "head_dim"),
])
def test_bench_case_rejects_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchCase(**{"name": "x", "pattern": Causal(), "grid": (8,), **kwargs})


def test_row_ratios_follow_from_the_timings():
    case = BenchCase("causal-48", Causal(), (48,), heads=2, head_dim=4)
    row = bench_case(case, backend="sdpa", repeats=2)
    assert row["density"] == 48 * 49 / 2 / 48**2
    assert row["ideal_speedup"] == 1 / row["density"]
    assert row["speedup"] == row["dense_ms"] / row["ms"]
    assert row["efficiency"] == pytest.approx(row["speedup"] / row["ideal_speedup"], rel=1e-12)
    assert row["ms"] <= row["ms_median"] and row["dense_ms"] <= row["dense_ms_median"]
    assert row["notes"] == []


@pytest.mark.parametrize("peer", ["natten", "local-attention"])
def test_missing_or_inapplicable_peer_is_skipped_with_a_note(peer):
    key = PEERS[peer].key
    row = bench_case(BenchCase("causal-32", Causal(), (32,), heads=1, head_dim=4), peers=[peer], repeats=1)
    assert row[f"{key}_ms"] is None and row[f"{key}_speedup"] is None and row[f"{key}_efficiency"] is None
    module = peer.replace("-", "_")
    reason = "not installed" if importlib.util.find_spec(module) is None else "runs only Neighborhood patterns"
    (note,) = row["notes"]
    assert note.startswith(f"{peer}: skipped, {reason}")


def test_run_rejects_unknown_peer_and_backend():
    with pytest.raises(ValueError, match="unknown peer"):
        run_pattern_bench(QUICK_CASES, peers=["xformers"], progress=False)
    with pytest.raises(ValueError, match="unknown backend='nope'"):
        run_pattern_bench(QUICK_CASES, backend="nope", progress=False)


def test_markdown_table():
    rows = [
        dict(case="a", shape="64x64", density=0.03125, dense_ms=250.0, ms=12.5, speedup=20.0, ideal_speedup=32.0,
             efficiency=0.625, peak_mb=3.4, flex_ms=None, flex_speedup=None, flex_efficiency=None,
             notes=["flex: skipped, why"]),
        dict(case="b", shape="4096", density=0.5, dense_ms=1.0, ms=0.5, speedup=2.0, ideal_speedup=2.0,
             efficiency=1.0, peak_mb=None, flex_ms=0.25, flex_speedup=4.0, flex_efficiency=2.0, notes=[]),
    ]
    assert to_markdown(rows) == (
        "| case | shape | density | dense ms | ms | speedup | ideal | efficiency | peak MB | flex ms | flex speedup "
        "| flex eff. |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| a | 64x64 | 0.0312 | 250 | 12.5 | 20.0x | 32.0x | 0.62 | 3 | — | — | — |\n"
        "| b | 4096 | 0.5000 | 1.0 | 0.500 | 2.0x | 2.0x | 1.00 | — | 0.250 | 4.0x | 2.00 |\n"
        "\n"
        "- a: flex: skipped, why\n"
    )


def test_markdown_drops_peers_that_never_ran_and_merges_shared_notes():
    note = "natten: skipped, not installed (pip install natten)"
    rows = [dict(case=c, shape="8", density=1.0, dense_ms=1.0, ms=1.0, speedup=1.0, ideal_speedup=1.0,
                 efficiency=1.0, peak_mb=1.0, natten_ms=None, notes=[note]) for c in ("a", "b")]
    text = to_markdown(rows)
    assert "natten ms" not in text.splitlines()[0]
    assert text.endswith(f"\n- {note}\n")


def test_time_call_counts_repeats_and_stops_at_max_s():
    calls = []
    timing = time_call(lambda: calls.append(1), repeats=4)
    assert len(calls) == 5 and len(timing.samples_ms) == 4  # warm-up + 4
    assert timing.min_ms <= timing.median_ms
    slow = time_call(lambda: time.sleep(0.02), repeats=5, max_s=0.03)
    assert len(slow.samples_ms) == 1 and slow.first_ms >= 20 and slow.min_ms >= 20
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="RSS sampling needs /proc")
def test_peak_memory_sees_a_temporary_and_an_output():
    size_mb = 64

    def temporary():
        t = torch.ones(size_mb * 2**20 // 4)  # touched: resident
        time.sleep(0.05)  # long enough for the sampler
        del t

    def output():
        return torch.ones(size_mb * 2**20 // 4)

    for fn in (temporary, output):
        peak = peak_memory_mb(fn)
        assert size_mb * 0.9 <= peak <= size_mb * 1.5, (fn.__name__, peak)
    assert peak_memory_mb(lambda: None) < 8


@pytest.mark.slow
def test_flex_peer_matches_ours():
    # compiling FlexAttention takes 10-30 s on CPU: slow tier only
    case = BenchCase("window-256", "neighborhood(kernel_size=33)", (256,), heads=2, head_dim=16)
    row = bench_case(case, peers=["flex"], repeats=1)
    assert row["notes"] == [] and row["flex_ms"] > 0 and math.isfinite(row["flex_speedup"])
    assert row["flex_max_diff"] < 1e-5
