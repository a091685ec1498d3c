"""ContextParallel and the data-parallel helpers: which modules are supported (read from their capabilities) and
argument errors (in-process; the multi-process runs are in tests/distributed/test_context_parallel.py)."""

import pytest
import torch

import headwise
from headwise.parallel import ContextParallel, init_from_env, supports


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "moa"])
def test_softmax_variants_are_supported(variant):
    assert supports(headwise.create(variant, dim=16, heads=4))


@pytest.mark.parametrize("variant", ["moba", "hip"])
def test_variants_without_a_softmax_step_are_not(variant):
    assert not supports(headwise.create(variant, dim=16, heads=4))


def test_other_modules_are_refused():
    with pytest.raises(TypeError, match="ContextParallel supports"):
        ContextParallel(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("kw,match", [(dict(method="tree"), "method"), (dict(layout="striped"), "layout")],
                         ids=["method", "layout"])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ContextParallel(headwise.create("mha", dim=16, heads=4), **kw)


def test_init_from_env_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is False
