"""The ``headwise`` command line, driven through ``headwise.cli.main([...])`` on tiny inputs."""

import json

import matplotlib.image
import pytest

from headwise.bench.patterns import BenchCase
from headwise.cli import main
from headwise.patterns import Causal

# tiny cases so the benchmark and the demo take well under a second of timing
TINY = (
    BenchCase("tiny-causal", Causal(), (64,), heads=2, head_dim=8),
    BenchCase("tiny-window", "neighborhood(kernel_size=(3, 5))", (10, 12), heads=2, head_dim=8),
)

ROW_FIELDS = {"case", "pattern", "shape", "heads", "head_dim", "density", "dense_ms", "ms", "speedup",
              "ideal_speedup", "efficiency", "peak_mb"}


def test_list_shows_variants_with_config_and_patterns(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mha" in out and "kv_heads=None" in out  # a variant and one of its config fields
    assert "Multi-head softmax attention" in out  # its docstring summary
    for name in ("neighborhood", "causal", "window", "segments"):
        assert name in out


def test_show_pattern_ascii_and_tile_stats(capsys):
    # 1-D neighborhood, 8 tokens, kernel 3: windows shifted (not cropped) at the borders, worked out by hand
    assert main(["show-pattern", "neighborhood(kernel_size=3)", "--grid", "8", "--tile", "4"]) == 0
    out = capsys.readouterr().out
    assert "density 0.3750: 24 of 64 (query, key) pairs attend" in out
    # query tiles {0..3}, {4..7} x key tiles {0..3}, {4..7}: every tile touched, none complete
    assert "4 of 4 tiles visited (0 full, 4 partial)" in out
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert rows == [
        "0  xxx.....",
        "1  xxx.....",
        "2  .xxx....",
        "3  ..xxx...",
        "4  ...xxx..",
        "5  ....xxx.",
        "6  .....xxx",
        "7  .....xxx",
    ]


def test_show_pattern_blocked_tiles_are_full(capsys):
    assert main(["show-pattern", "blocked(kernel_size=4)", "--grid", "12", "--tile", "4"]) == 0
    assert "3 of 9 tiles visited (3 full, 0 partial)" in capsys.readouterr().out


def test_show_pattern_writes_png(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["show-pattern", "neighborhood(kernel_size=(3, 5))", "--grid", "12,10", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_show_pattern_png_of_a_long_sequence_is_pooled(tmp_path, capsys):
    out = tmp_path / "long.png"
    assert main(["show-pattern", "window(window=16)", "--n", "3000", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "N = 3000 tokens" in text and "xx" not in text  # too long for ASCII
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show-pattern", "neighborhood(kernel_size=", "--grid", "16"], "malformed"),
        (["show-pattern", "nosuch(k=1)", "--grid", "16"], "unknown pattern 'nosuch'"),
        (["show-pattern", "neighborhood(kernel_size=99)", "--grid", "16"], "kernel_size=99"),
        (["show-pattern", "neighborhood(kernel_size=3)", "--grid", "3,a"], "--grid"),
        (["show-pattern", "causal"], "give --grid or --n"),
        (["show-pattern", "causal", "--n", "8", "--head", "1"], "--head 1"),
        (["bench", "patterns", "--cases", "no-such-case"], "unknown benchmark case 'no-such-case'"),
    ],
    ids=["malformed", "unknown-name", "kernel-too-big", "bad-grid", "no-length", "head-of-shared", "bad-case"],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv, cases=TINY) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("headwise: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_unknown_backend_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "patterns", "--backend", "nope"], cases=TINY)
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_bench_patterns_writes_json_rows(tmp_path, capsys):
    path = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    argv = ["bench", "patterns", "--json", str(path), "--markdown", str(md), "--repeats", "2", "--no-progress"]
    assert main(argv, cases=TINY) == 0
    out = capsys.readouterr().out
    assert "tiny-causal" in out and "tiny-window" in out  # the printed table
    data = json.loads(path.read_text())
    header = data["header"]
    assert header["torch"] and header["threads"] >= 1 and header["machine"] and header["backend"] == "blocksparse"
    rows = data["rows"]
    assert [r["case"] for r in rows] == ["tiny-causal", "tiny-window"]
    for r in rows:
        assert ROW_FIELDS <= set(r)
        assert r["heads"] == 2 and r["head_dim"] == 8
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])
        assert r["ideal_speedup"] == pytest.approx(1 / r["density"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        assert r["peak_mb"] is not None and r["peak_mb"] >= 0
    assert rows[0]["density"] == 64 * 65 / 2 / 64**2  # causal, 64 tokens
    assert rows[1]["density"] == 15 / 120  # each of the 120 queries sees exactly 3 x 5 keys
    assert rows[1]["shape"] == "10x12" and rows[1]["pattern"] == "neighborhood(kernel_size=(3, 5))"
    assert md.read_text().startswith("| case | shape | density |")


def test_bench_patterns_selects_cases(tmp_path):
    path = tmp_path / "one.json"
    argv = ["bench", "patterns", "--cases", "tiny-window", "--json", str(path), "--repeats", "1", "--no-progress"]
    assert main(argv, cases=TINY) == 0
    assert [r["case"] for r in json.loads(path.read_text())["rows"]] == ["tiny-window"]


def test_demo_writes_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--arena-steps", "0.003"], cases=TINY[:1]) == 0
    out = capsys.readouterr().out
    (folder,) = tmp_path.glob("demo-*")
    report = folder / "report.md"
    assert f"wrote {report}" in out
    text = report.read_text()
    assert "![" in text and (folder / "pattern.png").stat().st_size > 0
    assert "| case | shape | density |" in text and "| tiny-causal | 64 |" in text
    assert "max abs difference" in text
    assert json.loads((folder / "bench.json").read_text())["rows"][0]["case"] == "tiny-causal"


def test_every_subcommand_is_a_module_with_add_arguments_and_main():
    import importlib

    from headwise.cli import COMMANDS

    for cmd in COMMANDS:
        module = importlib.import_module(cmd.module)
        assert callable(module.add_arguments) and callable(module.main), cmd.name


def test_every_bench_subcommand_takes_the_common_flags():
    from headwise.cli import COMMANDS, build_parser

    parser = build_parser()
    benches = [c.name.split()[1] for c in COMMANDS if c.name.startswith("bench ")]
    assert set(benches) == {"patterns", "variants", "linear", "distributed", "dynamic"}
    for name in benches:
        args = parser.parse_args(["bench", name, "--quick", "--json", "a.json", "--markdown", "b.md", "--no-progress"])
        assert (args.quick, args.json, args.markdown, args.no_progress) == (True, "a.json", "b.md", True), name
