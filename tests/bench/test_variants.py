"""The variants benchmark on tiny shapes: rows, baseline ratios, skips with notes, JSON, CLI options."""

from __future__ import annotations

import argparse
import json

import pytest

from headwise.bench import variants as bench


def test_run_small_shapes(tmp_path):
    path = tmp_path / "v.json"
    names = ["attention_experts(experts=2)", "random_features", "mha(heads=5)", "no_such_variant"]
    rows = bench.run(json_path=path, names=names, dim=32, heads=4, lengths=[16, 33], repeats=1)
    assert [(r["variant"], r["n"]) for r in rows] == [(s, n) for n in (16, 33) for s in ["mha", *names]]
    for r in rows:
        assert r["dim"] == 32 and r["batch"] == 1 and r["heads"] == 4
    measured = [r for r in rows if r["variant"] in ("mha", "attention_experts(experts=2)", "random_features")]
    for r in measured:
        assert r["ms"] > 0 and r["ms_median"] >= r["ms"] and r["first_ms"] > 0
        assert r["peak_mb"] is None or r["peak_mb"] >= 0
        assert r["params"] > 0 and r["notes"] == []
    mha = {r["n"]: r for r in rows if r["variant"] == "mha"}
    for r in measured:
        assert r["vs_mha"] == pytest.approx(r["ms"] / mha[r["n"]]["ms"])
        assert r["params_vs_mha"] == pytest.approx(r["params"] / mha[r["n"]]["params"])
    assert all(r["vs_mha"] == 1.0 for r in mha.values())
    # random_features: its frozen query-key matrices are buffers, not parameters
    rf = next(r for r in measured if r["variant"] == "random_features")
    assert rf["params"] == 4 * 32 * 32 and rf["buffers"] == 4 * 32 * 32
    # a spec that cannot be built at the shape (heads=5 does not divide dim=32) or at all: a row with a note
    for r in rows:
        if r["variant"] in ("mha(heads=5)", "no_such_variant"):
            assert r["ms"] is None and r["vs_mha"] is None
            assert len(r["notes"]) == 1 and r["notes"][0].startswith("skipped: cannot build")
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["header"]["lengths"] == [16, 33] and saved["header"]["dim"] == 32
    table = bench.to_markdown(rows)
    assert table.count("\n| mha |") == 2 and "skipped: cannot build" in table


def test_default_specs_cover_the_registry():
    import headwise

    specs = bench.default_specs(heads=8)
    assert specs[0] == "mha" and set(headwise.available()) <= set(specs)
    if "moh" in headwise.available():
        assert "moh(shared_heads=4, topk=2, compute='sparse')" in specs
        assert "moh(shared_heads=4, topk=2, compute='dense')" in specs


def test_arguments():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--quick", "--json", "out.json", "--names", "mha", "moh(topk=1, compute='dense')"])
    assert args.quick and args.json == "out.json" and args.names == ["mha", "moh(topk=1, compute='dense')"]
    assert p.parse_args([]).names is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(lengths=[0]), "lengths"),
    (dict(repeats=0), "repeats"),
    (dict(dim=0), "dim"),
    (dict(names="mha"), "names"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bench.run(**kwargs)


def test_variant_without_heads_is_built_without_it(monkeypatch):
    from dataclasses import dataclass

    import torch

    from headwise.variants import registry
    from headwise.variants.base import Variant

    class NoHeads(Variant):  # a single-head design: its config has no `heads`
        @dataclass
        class Config:
            dim: int  # model width

        def build(self, cfg):
            self.proj = torch.nn.Linear(cfg.dim, cfg.dim)

        def forward(self, x):
            return self.proj(x)

    monkeypatch.setitem(registry._REGISTRY, "bench_test_no_heads", NoHeads)
    rows = bench.run(names=["bench_test_no_heads"], dim=16, heads=4, lengths=[8], repeats=1)
    row = rows[1]
    assert row["variant"] == "bench_test_no_heads" and row["params"] == 16 * 16 + 16 and row["ms"] > 0
    assert row["notes"] == ["built without heads= (not one of its config keys)"]


def test_measure_interleaves_rounds_and_respects_max_s():
    import time

    calls = []

    def fake(name, sleep_s=0.0):
        def forward():
            calls.append(name)
            time.sleep(sleep_s)
        return forward

    rows = [{"variant": v, "first_ms": 0.0, "notes": []} for v in ("a", "b", "slow")]
    fns = [fake("a"), fake("b"), fake("slow", 0.03)]
    bench.measure(list(zip(rows, fns)), repeats=3, max_s=0.05)
    timed = calls[: len(calls) - 3]  # the last three calls measure peak memory, one per variant
    assert timed == ["a", "b", "slow", "a", "b", "slow", "a", "b"]  # round-robin; "slow" stops after 0.05 s
    assert [r["timed_calls"] for r in rows] == [3, 3, 2]
    assert rows[2]["notes"] == ["2 of 3 timed calls (max_s=0.05)"] and rows[0]["notes"] == []
    assert rows[2]["ms"] >= 30 and rows[2]["ms_median"] >= rows[2]["ms"]


def test_declared_layouts_and_inputs_decide_what_each_variant_is_fed():
    rows = bench.run(names=["lka", "spectral", "window_cross", "nin_gate"], dim=16, heads=4, lengths=[16, 15],
                     repeats=1)
    by = {(r["variant"], r["n"]): r for r in rows}
    for name in ("lka", "spectral", "nin_gate"):  # image map of a 4 x 4 grid, grid=(4, 4), tokens=16
        row = by[(name, 16)]
        assert row["ms"] > 0 and not any(n.startswith(("skipped", "output")) for n in row["notes"]), row
    assert by[("window_cross", 16)]["notes"] == ["skipped: forward needs ['queries'] besides x"]
    assert any(n.startswith("skipped:") and "square" in n for n in by[("lka", 15)]["notes"])
    assert by[("nin_gate", 15)]["ms"] > 0  # sized for tokens=15: no grid needed
