"""ContextParallel and the data-parallel helpers: argument errors (in-process; the multi-process runs are in
test_context_parallel.py)."""

import pytest
import torch

import headwise
from headwise.distributed import ContextParallel, head_parallel_attention, init_from_env, ring_attention
from headwise.distributed.wrappers import supports


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa"])
def test_softmax_variants_are_supported(variant):
    assert supports(headwise.create(variant, dim=16, heads=4))


def test_other_modules_are_refused():
    with pytest.raises(TypeError, match="ContextParallel supports"):
        ContextParallel(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("kw,match", [(dict(method="tree"), "method"), (dict(layout="striped"), "layout")],
                         ids=["method", "layout"])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ContextParallel(headwise.create("mha", dim=16, heads=4), **kw)


@pytest.mark.parametrize("fn", [ring_attention, head_parallel_attention], ids=["ring", "heads"])
def test_cross_attention_shards_are_refused(fn):
    q = torch.zeros(1, 2, 8, 4)
    k = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="self-attention"):
        fn(q, k, k)


def test_init_from_env_outside_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is False
