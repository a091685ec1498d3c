"""The moa module: per-head elastic windows on the engine vs the dense reference, plan loading, errors."""

import pytest
import torch

import headwise
from headwise.moa import MoAPlan
from headwise.patterns import SinkWindow
from headwise.moa import apply_plan
from headwise.variants.moa import MixtureOfSparseAttention, naive_moa

PLAN = MoAPlan(alphas=[[3, 0, 16, -4], [0, 0, 0, 0]], betas=[[0, 0.5, 0.25, 0.75], [1, 1, 1, 1]], sinks=2)


@pytest.mark.parametrize("N, kv_heads", [(1, 2), (63, 4), (500, 2)], ids=["N1-Hkv2", "N63-Hkv4", "N500-Hkv2"])
def test_engine_matches_reference_forward_and_grad(N, kv_heads):
    torch.manual_seed(0)
    m = headwise.create("moa", dim=16, heads=4, kv_heads=kv_heads, plan=PLAN, backend="blocksparse").double()
    x = torch.randn(2 if N < 500 else 1, N, 16, dtype=torch.float64, requires_grad=True)
    out = m(x)
    ref = naive_moa(m, x)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_plan_from_json_and_layer(tmp_path):
    path = tmp_path / "plan.json"
    PLAN.save(path)
    m = headwise.create("moa(layer=1)", dim=16, heads=4, plan=str(path))
    assert m.plan == PLAN and m.layer == 1
    assert m.pattern_at(10) == PLAN.pattern(1, 10)


def test_default_plan_and_apply_plan_keeps_weights():
    m = headwise.create("moa", dim=16, heads=4)
    assert m.plan.layers == 1 and m.pattern_at(1000) == PLAN.uniform(1, 4, 64, 0.125, 4).pattern(0, 1000)
    torch.manual_seed(1)
    model = torch.nn.Sequential(headwise.create("mha", dim=16, heads=4, pattern="causal"),
                                headwise.create("mha", dim=16, heads=4, pattern="causal"))
    moa = apply_plan(model, PLAN)
    assert all(isinstance(l, MixtureOfSparseAttention) for l in moa) and [l.layer for l in moa] == [0, 1]
    x = torch.randn(1, 9, 16)
    # layer 1 of PLAN is dense causal: it equals the mha layer
    assert torch.allclose(moa[1](x), model[1](x), atol=1e-6)
    assert isinstance(model[0], headwise.MultiHeadAttention) and not isinstance(model[0], MixtureOfSparseAttention)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(heads=2, plan=PLAN), ValueError, "the plan has 4 heads per layer but heads=2"),
    (dict(heads=4, plan=PLAN, layer=2), ValueError, "layer=2"),
    (dict(heads=4, plan=42), ValueError, "plan=42"),
    (dict(heads=4, plan="/no/such/plan.json"), ValueError, "not found"),
    (dict(heads=4, pattern=SinkWindow(8, 0)), ValueError, "pass pattern=None"),
], ids=["heads", "layer", "plan-type", "plan-path", "pattern"])
def test_bad_config(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        headwise.create("moa", dim=16, **kwargs)


def test_self_attention_only_and_layer_count():
    m = headwise.create("moa", dim=16, heads=4, plan=PLAN)
    with pytest.raises(TypeError, match="positional argument"):  # self-attention only: forward(x)
        m(torch.randn(1, 5, 16), torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="the plan has 2 layers but the model has 1"):
        apply_plan(torch.nn.Sequential(headwise.create("mha", dim=16, heads=4, pattern="causal")), PLAN)


def test_causal_pattern_is_accepted_and_default_plan_serves_any_layer():
    m = headwise.create("moa", dim=16, heads=4, pattern="causal", layer=3)
    assert m.config.pattern is None and m.plan.layers == 4
    first = headwise.create("moa", dim=16, heads=4)
    first.load_state_dict(m.state_dict())
    x = torch.randn(1, 70, 16)
    assert torch.equal(m(x), first(x))  # the uniform plan is the same at every layer
