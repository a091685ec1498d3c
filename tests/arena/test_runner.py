import json

import pytest
import torch

from headwise.arena import runner
from headwise.arena.leaderboard import summarize, to_markdown
from headwise.arena.tasks import TASKS, get_task
from headwise.cli import main

# tiny settings per task: a few steps each, so every task's whole path (data, model, loss, eval) runs in seconds
TINY = {
    "mqar": dict(batch=6, dim=16, heads=2, seq_len=32, pairs=(2, 4, 8), eval_examples=30),
    "icl_regression": dict(batch=16, eval_tasks=50, eval_lengths=(10, 20)),
    "induction": dict(batch=4, dim=16, heads=2, seq_len=16, test_lengths=(32,), eval_examples=8),
    "passkey": dict(batch=4, dim=16, heads=2, seq_len=32, lengths=(24, 32), depths=(0.0, 1.0), eval_examples=4),
    "text": dict(batch=4, dim=16, heads=2, seq_len=32, eval_windows=4),
    "listops": dict(batch=4, dim=16, heads=2, max_depth=3, max_args=3, min_len=4, max_len=32, eval_examples=8),
    "fashion_mnist": dict(batch=8, dim=16, heads=2, depth=1, train_split="test", train_size=64, eval_size=32),
}


def test_every_task_has_a_tiny_setting():
    assert set(TINY) == set(TASKS)


@pytest.mark.parametrize("name", sorted(TINY))
def test_smoke_training_per_task(name):
    task = get_task(name, steps=3, **TINY[name])
    row = runner.run_one(task, "mha", 0, measure_memory=False)
    assert row["status"] == "ok", row["notes"]
    assert row["value"] is not None and row["params"] > 0 and row["train_s"] > 0 and row["tokens_per_s"] > 0
    assert len(row["curve"]) == 3
    assert row["metric"] == task.metric


def test_run_writes_results_leaderboard_plots_and_resumes(tmp_path, capsys):
    overrides = {"mqar": TINY["mqar"], "icl_regression": TINY["icl_regression"]}
    logs = []
    rows = runner.run(["mqar", "icl_regression"], "mha(heads=1),nin_gate", seeds=2, steps=2, out=tmp_path,
                      task_overrides=overrides, progress=False, log=logs.append)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] == rows and data["header"]["tool"] == "headwise arena"
    keys = {"task", "variant", "seed", "metric", "value", "params", "train_s", "tokens_per_s", "peak_mb"}
    assert all(keys <= set(r) for r in rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2 * 2 + 2  # mha(heads=1) x 2 tasks x 2 seeds; nin_gate serves icl_regression only
    assert all(r["peak_mb"] is None or r["peak_mb"] >= 0 for r in ok)
    (unsupported,) = [r for r in rows if r["status"] == "unsupported"]
    assert unsupported["task"] == "mqar" and "no causal mode" in unsupported["notes"][0]
    icl = [r for r in ok if r["task"] == "icl_regression"]
    assert {"ridge", "gd_one_step", "zero", "mse@10", "mse@20", "mse@40"} <= set(icl[0]["details"])
    board = (tmp_path / "leaderboard.md").read_text()
    assert "## mqar: accuracy (higher is better), 2 steps" in board and "nin_gate has no causal mode" in board
    assert "± " in board
    for task in ("mqar", "icl_regression"):
        for kind in ("metric", "curves", "quality_vs_speed"):
            png = tmp_path / "plots" / f"{task}_{kind}.png"
            assert png.read_bytes()[:4] == b"\x89PNG"
    # a rerun into the same folder recomputes nothing
    logs.clear()
    again = runner.run(["mqar", "icl_regression"], "mha(heads=1),nin_gate", seeds=2, steps=2, out=tmp_path,
                       task_overrides=overrides, progress=False, log=logs.append, plots=False)
    assert logs == [] and again == rows


def test_failed_run_is_a_row_not_a_crash(tmp_path, monkeypatch):
    task = get_task("mqar", steps=2, **TINY["mqar"])
    monkeypatch.setattr(task, "evaluate", lambda model: 1 / 0)
    row = runner.run_one(task, "mha", 0, measure_memory=False)
    assert row["status"] == "failed" and "ZeroDivisionError" in row["notes"][0]


def test_leaderboard_mean_and_spread():
    base = dict(task="t", metric="mse", higher_is_better=False, status="ok", steps=5, params=10, train_s=1.0,
                tokens_per_s=100.0, peak_mb=1.0, details={}, curve=[], notes=[])
    rows = [dict(base, variant="a", seed=s, value=v) for s, v in enumerate((1.0, 3.0))]
    rows += [dict(base, variant="b", seed=0, value=0.5)]
    (a, b) = summarize(rows)
    assert a["mean"] == 2.0 and a["std"] == pytest.approx(2 ** 0.5) and a["rank"] == 2 and b["rank"] == 1
    md = to_markdown(rows)
    assert md.index("| 1 | b") < md.index("| 2 | a") and "2.0000 ± 1.4142" in md


def test_cli_arena(tmp_path, capsys):
    code = main(["arena", "--task", "icl_regression", "--variants", "mha(heads=2)", "--seeds", "1", "--steps", "2",
                 "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert code == 0
    assert "icl_regression" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["variant"] == "mha(heads=2)"
    assert main(["arena", "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["arena", "--task", "mqar", "--variants", "mha(heads=", "--out", str(tmp_path)]) == 2


def test_merge_combines_folders_later_wins_and_filters_tasks(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    overrides = {"icl_regression": TINY["icl_regression"], "mqar": TINY["mqar"]}
    ra = runner.run(["icl_regression", "mqar"], "mha(heads=1)", seeds=1, steps=2, out=a, task_overrides=overrides,
                    progress=False, log=lambda m: None, plots=False)
    rb = runner.run(["icl_regression"], "mha(heads=1),mha(heads=2)", seeds=1, steps=2, out=b,
                    task_overrides={"icl_regression": TINY["icl_regression"]}, progress=False, log=lambda m: None,
                    plots=False)
    rows = runner.merge(out, [f"{a}:mqar", str(b)], plots=False)
    key = lambda r: (r["task"], r["variant"], r["seed"])
    assert sorted(map(key, rows)) == sorted(map(key, [r for r in ra if r["task"] == "mqar"] + rb))
    data = json.loads((out / "results.json").read_text())
    assert set(data["header"]["tasks"]) == {"mqar", "icl_regression"} and len(data["header"]["merged_from"]) == 2
    assert "## icl_regression" in (out / "leaderboard.md").read_text()
    assert main(["arena", "--merge", str(a), str(b), "--out", str(tmp_path / "cli"), "--no-plots"]) == 0
    capsys.readouterr()
    assert main(["arena", "--merge", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no results.json" in capsys.readouterr().err
    assert main(["arena", "--out", str(out)]) == 2
    assert "--task is required" in capsys.readouterr().err


def test_parse_overrides():
    assert runner.parse_overrides(["mqar.batch=32", "mqar.pairs=(4, 8)", "text.positions='none'"]) == {
        "mqar": {"batch": 32, "pairs": (4, 8)}, "text": {"positions": "none"}}
    with pytest.raises(ValueError, match="TASK.KEY=VALUE"):
        runner.parse_overrides(["batch=3"])
    with pytest.raises(ValueError, match="not a Python literal"):
        runner.parse_overrides(["mqar.batch=__import__('os')"])
    with pytest.raises(ValueError, match="unknown config key"):
        get_task("mqar", nope=1)
