"""The linear-attention benchmark on tiny shapes: rows, ratios, skips with notes, summary, JSON, CLI options."""

from __future__ import annotations

import argparse
import json

import pytest

from headwise.bench import linear as bench


@pytest.fixture(autouse=True)
def short_timing(monkeypatch):
    """About 50 ms of timed calls per measurement instead of the benchmark's 2 s: these are tests, not timings."""
    monkeypatch.setattr(bench, "MIN_TIMED_S", 0.05)


def test_run_small_shapes(tmp_path):
    path = tmp_path / "lin.json"
    rows = bench.run(json_path=path, lengths=[100, 40], heads=2, head_dim=8, block_size=16, repeats=1, rounds=1)
    keys = [(r["n"], r["pass"], r["impl"]) for r in rows]
    assert keys == [(n, p, i) for n in (40, 100) for p in ("fwd", "fwd+bwd") for i in ("sdpa_causal", "chunk", "naive")]
    for r in rows:
        assert r["ms"] > 0 and r["ms_median"] >= r["ms"] and r["first_ms"] > 0 and r["notes"] == []
        assert r["us_per_token"] == pytest.approx(r["ms"] * 1e3 / r["n"])
        sdpa = next(s for s in rows if s["impl"] == "sdpa_causal" and (s["n"], s["pass"]) == (r["n"], r["pass"]))
        assert r["vs_sdpa"] == pytest.approx(sdpa["ms"] / r["ms"])
    # the first length is timed `repeats` times; later ones up to MAX_CALLS (how many depends on the machine's
    # speed, so only the bounds are checked here)
    assert all(r["timed_calls"] == 1 for r in rows if r["n"] == 40)
    assert all(1 <= r["timed_calls"] <= bench.MAX_CALLS for r in rows if r["n"] == 100)
    summary = bench.summarize(rows)
    assert set(summary) == {"fwd", "fwd+bwd"}
    fwd = summary["fwd"]
    assert list(fwd["us_per_token"]) == [40, 100] and fwd["flatness"] >= 1.0
    assert fwd["long_vs_short"] == pytest.approx(fwd["us_per_token"][100] / fwd["us_per_token"][40])
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["header"]["lengths"] == [100, 40] and saved["header"]["heads"] == 2
    assert saved["summary"]["fwd"]["flatness"] == pytest.approx(fwd["flatness"])
    table = bench.to_markdown(rows)
    assert table.count("| chunk |") == 4 and "chunk fwd:" in table and "max/min" in table


def test_rounds_pool_their_samples(monkeypatch):
    """A second round times the fast calls again; each row keeps the minimum and the count over both."""
    seen = []
    real = bench.bench_one

    def recording(op, q, k, v, grad, pass_, calls, max_s):
        t = real(op, q, k, v, grad, pass_, calls, max_s)
        seen.append((q.shape[2], pass_, t.samples_ms))
        return t

    monkeypatch.setattr(bench, "bench_one", recording)
    monkeypatch.setattr(bench, "ROUND_MAX_MS", 1e9)
    rows = bench.run(lengths=[48], impls=["chunk"], passes=["fwd"], heads=1, head_dim=8, repeats=2, rounds=2)
    assert len(seen) == 2 and len(rows) == 1
    pooled = seen[0][2] + seen[1][2]
    assert rows[0]["timed_calls"] == len(pooled) and rows[0]["ms"] == min(pooled)
    monkeypatch.setattr(bench, "ROUND_MAX_MS", 0.0)  # nothing is fast enough to time again
    seen.clear()
    bench.run(lengths=[48], impls=["chunk"], passes=["fwd"], heads=1, head_dim=8, repeats=2, rounds=3)
    assert len(seen) == 1


def test_quadratic_implementations_are_skipped_past_the_time_limit():
    """With a tiny max_call_s, the quadratic forms run at the first length only; the chunked op always runs."""
    rows = bench.run(lengths=[32, 4096], passes=["fwd"], heads=1, head_dim=8, repeats=1, max_call_s=1e-4, rounds=1)
    by = {(r["impl"], r["n"]): r for r in rows}
    for impl in ("naive", "sdpa_causal"):
        assert by[impl, 32]["ms"] is not None
        skipped = by[impl, 4096]
        assert skipped["ms"] is None and skipped["us_per_token"] is None
        assert len(skipped["notes"]) == 1 and skipped["notes"][0].startswith("skipped: one call would take about")
    assert by["chunk", 4096]["ms"] is not None and by["chunk", 4096]["vs_sdpa"] is None
    assert "naive fwd N=4096: skipped" in bench.to_markdown(rows)


def test_naive_is_skipped_where_it_cannot_fit_in_memory(monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda: 2**16)  # 64 KiB: less than twice the 128 KiB needed
    rows = bench.run(lengths=[64], impls=["naive"], passes=["fwd"], heads=2, head_dim=8, repeats=1)
    assert rows[0]["ms"] is None and "[B, H, N, N] fp32 tensors" in rows[0]["notes"][0]


def test_arguments():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--quick", "--json", "out.json", "--impls", "chunk", "naive", "--passes", "fwd",
                         "--max-call-s", "5"])
    assert args.quick and args.json == "out.json" and args.impls == ["chunk", "naive"]
    assert args.passes == ["fwd"] and args.max_call_s == 5.0
    defaults = p.parse_args([])
    assert defaults.impls == list(bench.IMPLS) and defaults.passes == list(bench.PASSES) and defaults.lengths is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(lengths=[0]), "lengths"),
    (dict(impls=["flash"]), "impls"),
    (dict(impls="chunk"), "impls"),
    (dict(passes=["bwd"]), "passes"),
    (dict(repeats=0), "repeats"),
    (dict(heads=0), "heads"),
    (dict(max_call_s=0), "max_call_s"),
    (dict(rounds=0), "rounds"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run(**kwargs)
