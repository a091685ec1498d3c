"""``headwise simulate`` driven through ``headwise.cli.main([...])`` on tiny inputs."""

import json

import matplotlib.image
import pytest

from headwise.bench.patterns import BenchCase, run_pattern_bench
from headwise.cli import main

TINY = (
    BenchCase("tiny-blocked", "blocked(kernel_size=16)", (128,), heads=2, head_dim=8),
    BenchCase("tiny-2d", "neighborhood(kernel_size=(3, 5))", (16, 16), heads=2, head_dim=8),
)


def test_pattern_table_and_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["simulate", "neighborhood(kernel_size=3)", "--grid", "8", "--tile", "4", "--heads", "2",
                 "--head-dim", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "row-major bound" in printed and f"wrote {out}" in printed
    case = json.loads(out.read_text())["cases"][0]
    # 24 attended pairs per head of 64 (see tests/test_cli.py); every 4 x 4 tile is visited, none full
    assert case["attended_pairs"] == 2 * 24
    assert case["dense_flops"] == 4 * 2 * 64 * 4
    rm = case["schedules"][0]
    assert rm["name"] == "row-major" and (rm["visited"], rm["full"], rm["computed_pairs"]) == (8, 0, 128)
    assert rm["upper_bound"] == 1.0


def test_bench_cases_with_measured_speedup_and_plot(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    run_pattern_bench(TINY, repeats=1, progress=False).write_json(bench)  # what `bench patterns --json` writes
    measured = {r["case"]: r["speedup"] for r in json.loads(bench.read_text())["rows"]}
    capsys.readouterr()
    out = tmp_path / "sim.json"
    assert main(["simulate", "bench", "--measured", str(bench), "--tile", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured" in printed and "tiny-blocked" in printed and "tiny-2d" in printed
    plot = bench.with_suffix(".simulate.png")
    assert f"wrote {plot}" in printed
    assert matplotlib.image.imread(plot).shape[0] > 100
    cases = {c["case"]: c for c in json.loads(out.read_text())["cases"]}
    assert {k: c["measured_speedup"] for k, c in cases.items()} == measured
    assert cases["tiny-blocked"]["schedules"][1]["upper_bound"] == 8.0  # 128 / 16, tiles aligned with blocks


def test_bench_quick_case_by_name(capsys):
    assert main(["simulate", "bench", "--quick", "--cases", "1d-blocked"]) == 0
    printed = capsys.readouterr().out
    assert "1d-blocked" in printed and "32.0x" in printed and "2d-neighborhood" not in printed


def test_decode_json(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["simulate", "decode", "--params", "1000", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                 "--head-dim", "8", "--context", "100", "--batch", "2", "--density", "0.25",
                 "--flops-per-byte", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-k" in printed and "eFLOPs" in printed
    data = json.loads(out.read_text())
    assert data["dense"]["eflops"] == 311200 and data["sparse"]["eflops"] == 80800  # tests/simulate/test_kinetics.py


@pytest.mark.parametrize("argv, match", [
    (["simulate", "decode", "--params", "1e9"], "needs --layers, --heads, --head-dim, --context"),
    (["simulate", "decode", "--params", "1e9", "--layers", "2", "--heads", "6", "--kv-heads", "4", "--head-dim",
      "8", "--context", "9"], "multiple of kv_heads"),
    (["simulate", "neighborhood(kernel_size=3)", "--grid", "8", "--context", "5"], "--context not used"),
    (["simulate", "decode", "--grid", "8"], "--grid not used"),
    (["simulate", "nope(x=1)", "--grid", "8"], "unknown pattern"),
    (["simulate", "neighborhood(kernel_size=3)", "--grid", "8", "--tile", "0"], "--tile"),
    (["simulate", "bench", "--cases", "nope"], "unknown benchmark case"),
    (["simulate", "bench", "--measured", "/nonexistent/bench.json"], "--measured"),
], ids=["decode-missing", "decode-gqa", "pattern-with-decode-option", "decode-with-grid", "bad-spec", "tile0",
        "bad-case", "missing-measured"])
def test_bad_input_is_one_line_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwise: error: ") and match in err and "\n" not in err
