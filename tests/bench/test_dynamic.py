"""The dynamic-selection benchmark on tiny shapes: rows, ratios, realized density, JSON, markdown, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import headwise
from headwise.bench import dynamic as bench
from headwise.cli import main as cli_main
from headwise.core.selected import selection_mask
from headwise.patterns import Causal
from headwise.ops.selection import blocks_from_token_selection, hip_select, moba_select, vmoba_partition, vmoba_select

TINY = (
    bench.DynamicCase("moba-causal", "moba", (96,), {"block": 16, "topk": 2}, heads=2, head_dim=8),
    bench.DynamicCase("vmoba-2d", "vmoba", (2, 4, 8), {"partition": "2d", "block": (2, 4), "tau": 0.3},
                      heads=2, head_dim=8),
    bench.DynamicCase("dma-causal", "dma", (96,), {"window": 12}, heads=2, head_dim=8),
    bench.DynamicCase("hip-causal", "hip", (100,), {"block": 8, "topk": 2, "window": 2}, heads=2, head_dim=8),
)


def _qk(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)


@pytest.mark.parametrize("kind", ["moba", "vmoba", "hip"])
def test_visited_pairs_counts_the_dense_mask(kind):
    q, k = _qk(100)
    if kind == "moba":
        kv, rm = blocks_from_token_selection(moba_select(q, k, block=16, topk=3), 16)
        args, block, causal = (kv, rm), 16, True
    elif kind == "vmoba":
        kv, rm = blocks_from_token_selection(vmoba_select(q, k, block=10, tau=0.4), 10)
        args, block, causal = (kv, rm), 10, False
    else:
        args, block, causal = (hip_select(q, k, block=8, topk=3, window=2), None), 8, True
    mask = selection_mask(args[0], 100, 100, block_q=block, block_kv=block, row_mask=args[1],
                          pattern=Causal() if causal else None)
    assert bench.visited_pairs(*args, 100, block, causal) == int(mask.sum())


def test_run_tiny_cases(tmp_path):
    path = tmp_path / "dyn.json"
    report = bench.run(cases=TINY, json_path=path, repeats=1)
    rows = report["rows"]
    assert [r["case"] for r in rows] == [c.name for c in TINY]
    for r in rows:
        assert 0 < r["density"] <= 1 and r["ideal_speedup"] == pytest.approx(1 / r["density"])
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["select_ms"] > 0 and r["ms_median"] >= r["ms"]
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    dma = rows[2]
    assert dma["density"] == pytest.approx(sum(min(12, i + 1) for i in range(96)) / 96**2)
    saved = json.loads(path.read_text())
    assert saved["rows"] == rows and saved["header"]["tool"] == "headwise bench dynamic"
    assert saved["header"]["load_avg_1min_after"] is not None
    table = bench.to_markdown(rows, report["header"])
    assert "load average" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(TINY)
    assert "| moba-causal | block=16, topk=2 |" in table


def test_dma_case_skips_without_the_variant(monkeypatch):
    monkeypatch.setattr(headwise, "available", lambda: ["moba"])
    row = bench.bench_case(TINY[2], repeats=1)
    assert row.get("ms") is None and "skipped" in row["notes"][0]


def test_cli_bench_dynamic(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "QUICK_CASES", TINY[:1])
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert cli_main(["bench", "dynamic", "--quick", "--repeats", "1", "--markdown", str(md), "--json", str(js)]) == 0
    assert "moba-causal" in capsys.readouterr().out and "| moba-causal |" in md.read_text()
    assert json.loads(js.read_text())["rows"][0]["case"] == "moba-causal"
    assert cli_main(["bench", "dynamic", "--quick", "--cases", "nope"]) == 2
    assert "unknown benchmark case" in capsys.readouterr().err


def test_the_issue_cases_are_defined():
    by_name = {c.name: c for c in bench.CASES}
    assert by_name["moba-causal"].n == 16384 and by_name["moba-causal"].params == {"block": 512, "topk": 4}
    assert by_name["vmoba-3d"].grid == (16, 32, 32)
    assert by_name["hip-causal"].params["block"] * (by_name["hip-causal"].params["topk"]
                                                    + by_name["hip-causal"].params["window"]) == 16384 // 8
    assert by_name["dma-causal"].params["window"] == 16384 // 8
    for c in bench.CASES:
        if c.method == "vmoba":
            vmoba_partition(c.grid, c.params["partition"], c.params["block"])  # the blocks divide the grid
