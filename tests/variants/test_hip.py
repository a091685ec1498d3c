"""hip module: output and gradients vs projections + the dense reference of its selection (float64)."""

import pytest

import headwise
from headwise.ops.hip import naive_hip_attention
from common import assert_module_matches_projected_reference, assert_selection_covering_everything_is_mha, build, rand

CASES = [(4, 3, 2, True, 2, 63, {}), (16, 5, 1, True, 1, 500, {"kv_heads": 1}), (8, 2, 3, False, 1, 63, {}),
         (4, 2, 2, True, 1, 1, {})]


@pytest.mark.parametrize("block,topk,window,causal,B,N,kw", CASES,
                         ids=[f"block{c[0]}-topk{c[1]}-window{c[2]}-{'causal' if c[3] else 'full'}-B{c[4]}-N{c[5]}"
                              for c in CASES])
def test_module_matches_dense_reference(block, topk, window, causal, B, N, kw):
    m = build(f"hip(block={block}, topk={topk}, window={window}, causal={causal})", dim=16, heads=2, **kw)
    assert_module_matches_projected_reference(m, rand(B, N, 16, seed=1), naive_hip_attention, block=block, topk=topk,
                                              window=window, causal=causal)


def test_window_and_topk_covering_every_block_is_full_attention():
    assert_selection_covering_everything_is_mha("hip(block=8, topk=4, window=4)", True)


def test_causal_leak_is_declared_where_the_blocked_selection_prunes():
    m = headwise.create("hip(block=8, topk=2, window=1)", dim=16, heads=2)
    assert "later tokens" in m.causal_leak(64)  # 8 blocks, 3 kept
    assert m.causal_leak(24) is None  # 3 blocks: all kept, exact
    assert headwise.create("hip(block=1, topk=2, window=1)", dim=16, heads=2).causal_leak(64) is None
    assert headwise.create("hip(block=8, topk=2, window=1, causal=False)", dim=16, heads=2).causal_leak(64) is None


@pytest.mark.parametrize("kw,match", [({"window": 0}, "window"), ({"topk": 1.5}, "topk")], ids=["window", "topk"])
def test_bad_configs_raise_naming_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("hip", **{"dim": 16, "heads": 2, **kw})
