"""moba module: output and gradients vs projections + the dense reference of its selection (float64)."""

import pytest
import torch

import headwise
from headwise.ops.moba import naive_moba_attention
from common import assert_module_matches_projected_reference, assert_selection_covering_everything_is_mha, build, rand

CASES = [(8, 3, True, 1, 63, {}), (8, 3, True, 2, 1, {}), (32, 4, True, 1, 500, {"kv_heads": 1}), (7, 2, False, 2, 63, {})]


@pytest.mark.parametrize("block,topk,causal,B,N,kw", CASES,
                         ids=[f"block{c[0]}-topk{c[1]}-{'causal' if c[2] else 'full'}-B{c[3]}-N{c[4]}" for c in CASES])
def test_module_matches_dense_reference(block, topk, causal, B, N, kw):
    m = build(f"moba(block={block}, topk={topk}, causal={causal})", dim=16, heads=2, **kw)
    assert_module_matches_projected_reference(m, rand(B, N, 16, seed=1), naive_moba_attention, block=block, topk=topk,
                                              causal=causal)


@pytest.mark.parametrize("spec,causal", [("moba(block=8, topk=8)", True), ("moba(block=16, topk=100, causal=False)", False)],
                         ids=["topk-all", "full"])
def test_degenerate_settings_are_full_attention(spec, causal):
    assert_selection_covering_everything_is_mha(spec, causal)


def test_float32_runs_and_selection_is_not_differentiated():
    m = headwise.create("moba(block=16, topk=2)", dim=32, heads=4)
    x = torch.randn(2, 100, 32, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kw,match", [({"block": 0}, "block"), ({"topk": 0}, "topk"), ({"causal": "yes"}, "causal"),
                                      ({"backend": "sdpa"}, "backend"), ({"heads": 3}, "divisible")],
                         ids=["block", "topk", "causal", "backend", "heads"])
def test_bad_configs_raise_naming_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("moba", **{"dim": 16, "heads": 2, **kw})
