"""The learning claims of the arena on this CPU (slow: minutes each; run with ``-m slow``)."""

import pytest
import torch

from headwise.arena import runner
from headwise.arena.tasks import get_task

pytestmark = pytest.mark.slow


def _value(task, spec, seed=0):
    row = runner.run_one(task, spec, seed, measure_memory=False)
    assert row["status"] == "ok", row["notes"]
    return row


def test_mha_solves_mqar_quick():
    row = _value(get_task("mqar", quick=True), "mha")
    assert row["value"] >= 0.9, row["details"]


def test_icl_regression_needs_two_heads():
    task = get_task("icl_regression", quick=True)
    four = _value(task, "mha(heads=4)")
    one = _value(task, "mha(heads=1)")
    assert four["value"] <= 0.30, four["details"]
    assert one["value"] >= 0.35, one["details"]


def test_fashion_mnist_one_epoch():
    row = _value(get_task("fashion_mnist", quick=True), "mha")
    assert row["value"] >= 0.78
