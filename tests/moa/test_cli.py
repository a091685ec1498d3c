"""``headwise moa-plan``: a tiny end-to-end run writes a loadable plan; bad input exits 2 with one line."""

import json

import pytest

from headwise.cli import main
from headwise.moa import MoAPlan


def test_moa_plan_writes_a_plan_within_budget(tmp_path, capsys):
    out = tmp_path / "plan.json"
    weights = tmp_path / "w.pt"
    argv = ["moa-plan", "--task", "mqar", "--out", str(out), "--lengths", "64", "--steps", "0", "--batch", "4",
            "--calib-batches", "1", "--eval-examples", "6", "--alphas", "0,8", "--betas", "0,0.25,1", "--density", "0.5", "--sinks", "2",
            "--save-model", str(weights)]
    assert main(argv) == 0
    plan = MoAPlan.load(out)
    assert (plan.layers, plan.heads, plan.sinks) == (2, 4, 2)
    assert plan.density(64) <= 0.5 + 1e-9 and plan.meta["task"] == "mqar" and plan.meta["lengths"] == [64]
    assert {(a, b) for ra, rb in zip(plan.alphas, plan.betas) for a, b in zip(ra, rb)} <= {
        (a, b) for a in (0, 8) for b in (0, 0.25, 1)}
    printed = capsys.readouterr().out
    assert "dense causal" in printed and "(chosen)" in printed
    assert f"wrote {out}" in printed and plan.meta["shared_rule"] in [[a, b] for a in (0, 8) for b in (0, 0.25, 1)]
    # the saved (random, --steps 0) weights reload with --checkpoint and give the same plan
    out2 = tmp_path / "again.json"
    argv2 = [a if a != str(out) else str(out2) for a in argv[:-2]] + ["--checkpoint", str(weights)]
    assert main(argv2) == 0
    again = json.loads(out2.read_text())
    assert again["alphas"] == json.loads(out.read_text())["alphas"]


@pytest.mark.parametrize("extra, fragment", [
    (["--task", "listops"], "unsupported task='listops'"),
    (["--density", "0"], "--density must be in (0, 1]"),
    (["--lengths", "64,x"], "--lengths must be comma-separated numbers"),
    (["--points", "1"], "--points must be >= 2"),
    (["--density", "0.01"], "below the sparsest rule's density 0.1490 at N=64"),
], ids=["task", "density", "lengths", "points", "infeasible"])
def test_bad_input_exits_2(tmp_path, capsys, extra, fragment):
    argv = ["moa-plan", "--out", str(tmp_path / "p.json"), "--lengths", "64", "--steps", "0", "--batch", "3",
            "--calib-batches", "1", "--alphas", "0", "--betas", "0,1"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("headwise: error: moa-plan:") and fragment in err and err.count("\n") == 1
