"""The report: JSON validates against its schema, every PNG the HTML references exists, the CLI runs end to end
(demo with a few training steps, then reloading its checkpoint), and (slow) the page renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from headwise.analysis.report import Subject, inspect_model, referenced_images
from headwise.analysis.schema import METRICS_SCHEMA, check, validate
from headwise.cli import main


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report on the tiny LM, shared by the tests of this module (plotting is the slow part)."""
    from .conftest import TinyLM

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyLM().eval()
    tokens = torch.randint(0, 12, (3, 16), generator=torch.Generator().manual_seed(1))
    loss = lambda t: F.cross_entropy(model(t)[:, :-1].flatten(0, 1), t[:, 1:].flatten())  # noqa: E731
    subject = Subject(model, [tokens, tokens.flip(0)], model, loss, name="tiny", task={"what": "random tokens"},
                      divergence=(model, tokens, slice(1, 8)))
    out = tmp_path_factory.mktemp("report")
    try:
        metrics = inspect_model(subject, out, max_queries=8, clusters=3)
    finally:
        torch.set_num_threads(before)
    return metrics, out


def test_report_json_validates_and_has_every_metric(report):
    metrics, out = report
    on_disk = json.loads((out / "metrics.json").read_text())
    assert validate(on_disk) == []
    assert json.loads((out / "metrics.schema.json").read_text()) == json.loads(json.dumps(METRICS_SCHEMA))
    assert list(on_disk["layers"]) == ["blocks.0.attn", "blocks.1.attn"]
    for entry in on_disk["layers"].values():
        for key in ("entropy", "mean_distance", "special_attention", "pruning_importance", "gradient_importance",
                    "divergence"):
            assert len(entry[key]) == 4 and all(isinstance(v, float) for v in entry[key]), key
        assert len(entry["distance_profile"]) == 4
    assert on_disk["capture"]["records"][0]["n_queries"] == 16
    assert len(on_disk["rollout"]["matrix"]) == 16 and on_disk["flow"]["sources"] == [15]
    assert on_disk["clusters"]["k"] == 3 and len(on_disk["clusters"]["members"]) == 8


def test_every_referenced_png_exists(report):
    metrics, out = report
    images = referenced_images(out / "report.html")
    assert sorted(images) == sorted(f["file"] for f in metrics["figures"])
    assert {"heatmaps.png", "top_heads.png", "distance_profiles.png",
            "clusters.png", "rollout.png", "flow.png"} <= set(images)
    for name in images:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("layers"), "missing required key 'layers'"),
    (lambda m: m.update(extra=1), "unexpected key 'extra'"),
    (lambda m: m["layers"]["blocks.0.attn"].update(entropy="high"), "expected array"),
    (lambda m: m["layers"]["blocks.0.attn"]["sink_head"].append(3), "expected boolean"),
    (lambda m: m.update(schema_version=2), "not in [1]"),
], ids=["missing", "extra-key", "wrong-type", "bad-item", "enum"])
def test_schema_validator_rejects(report, mutate, message):
    metrics = json.loads((report[1] / "metrics.json").read_text())
    mutate(metrics)
    errors = validate(metrics)
    assert any(message in e for e in errors), errors
    with pytest.raises(ValueError, match="do not match the schema"):
        check(metrics)


def test_schema_agrees_with_jsonschema_if_installed(report):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads((report[1] / "metrics.json").read_text()), METRICS_SCHEMA)


def test_inspect_model_needs_attention(tmp_path):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no attention"):
        inspect_model(Subject(model, [torch.randn(2, 4)], model), tmp_path)


def test_icl_regression_subject_reports_kq_ov_patterns(tmp_path):
    from headwise.analysis.subjects import task_subject
    from headwise.arena.tasks import get_task

    task = get_task("icl_regression", quick=True, batch=4, num_context=9)
    torch.manual_seed(0)
    subject = task_subject(task, task.build("mha").eval(), "mha")
    assert subject.icl_dim == 5 and subject.divergence[1].shape == (4, 10, 6)
    metrics = inspect_model(subject, tmp_path, figures=False)
    (entry,) = metrics["layers"].values()
    assert len(entry["kq_diagonal"]) == 4 and 0 <= entry["ov_zero_sum"] <= 1
    assert metrics["figures"] == [] and referenced_images(tmp_path / "report.html") == []
    assert validate(json.loads((tmp_path / "metrics.json").read_text())) == []


def test_vit_on_a_grid_gets_2d_distances_and_a_rollout_image(tmp_path):
    from headwise.arena.models import build_vit

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_vit("mha", image_size=12, patch=3, dim=16, depth=2, heads=2).eval()  # 4 x 4 patches
        images = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
        metrics = inspect_model(Subject(model, [images], model, grid=model.grid, special_tokens=()), tmp_path)
    finally:
        torch.set_num_threads(before)
    entry = metrics["layers"]["blocks.0.mixer.inner"]
    assert max(entry["mean_distance"]) <= 3 * 2**0.5  # Euclidean on the 4 x 4 grid
    assert len(entry["distance_profile"][0]) == 5  # rounded distances 0 .. 4 (the corner-to-corner 4.24)
    assert "rollout.png" in referenced_images(tmp_path / "report.html")
    assert metrics["notes"] == ["no loss given: pruning and gradient importance not computed"]


def test_layer_of():
    from headwise.analysis.report import _layer_of

    layers = {"": 0, "blocks.0.mixer.inner": 0, "blocks.0.mixer.inner#1": 0}
    assert _layer_of("blocks.0.mixer.inner", layers) == "blocks.0.mixer.inner"
    assert _layer_of("blocks.0.mixer.inner.mha", layers) == "blocks.0.mixer.inner"
    assert _layer_of("other", layers) == ""
    assert _layer_of("other", {"blocks.1": 0}) is None


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_cli_demo_then_checkpoint(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["inspect", "--demo", "--steps", "3", "--out", str(out), "--no-progress", "--max-queries", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert validate(metrics) == []
    assert metrics["model"]["training"]["steps"] == 3 and metrics["task"]["task"] == "induction"
    assert all((out / f).exists() for f in referenced_images(out / "report.html"))
    again = tmp_path / "again"
    assert main(["inspect", str(out / "demo-model.pt"), "--out", str(again), "--segment", "2:9", "--no-figures"]) == 0
    reloaded = json.loads((again / "metrics.json").read_text())
    assert reloaded["layers"].keys() == metrics["layers"].keys()


@pytest.mark.parametrize("argv, message", [
    ([], "either a CHECKPOINT or --demo"),
    (["nope.pt"], "is not a file"),
    (["--demo", "--steps", "0"], "--steps must be a positive int"),
    (["--demo", "--segment", "5:2"], "--segment"),
], ids=["nothing", "missing-file", "zero-steps", "bad-segment"])
def test_cli_bad_input(tmp_path, capsys, argv, message):
    assert main(["inspect", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, out = report
    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1100,3000", (out / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page with pictures, not a blank one
