"""vmoba module: output and gradients vs projections + the dense reference of its selection (float64)."""

import pytest
import torch

import headwise
from headwise.ops.moba import naive_vmoba_attention
from common import assert_module_matches_projected_reference, assert_selection_covering_everything_is_mha, build, rand

CASES = [
    ("vmoba(grid=(3, 3, 7), partition='1d', block_1d=1)", 2, {}),
    ("vmoba(grid=(5, 10, 10), layer=1, block_2d=(5, 5), tau=0.5)", 1, {"kv_heads": 1}),
    ("vmoba(grid=(4, 5, 25), layer=2, block_3d=(2, 5, 5), selection='topk', topk=3)", 1, {}),
    ("vmoba(grid=(3, 3, 7), partition='1d', scope='query', tau=0.1)", 1, {}),
    ("vmoba(grid=(1, 1, 1))", 1, {}),
]


@pytest.mark.parametrize("spec,B,kw", CASES, ids=[f"{i}-B{b}" for i, (_, b, _) in enumerate(CASES)])
def test_module_matches_dense_reference(spec, B, kw):
    m = build(spec, dim=16, heads=2, **kw)
    c = m.config
    assert_module_matches_projected_reference(m, rand(B, c.grid[0] * c.grid[1] * c.grid[2], 16, seed=1),
                                              naive_vmoba_attention, grid=c.grid, partition=c.partition,
                                              block=c.block, selection=c.selection, scope=c.scope, tau=c.tau,
                                              topk=c.topk)


@pytest.mark.parametrize("spec", ["vmoba(grid=(4, 4, 4), tau=1.0)",
                                  "vmoba(grid=(4, 4, 4), selection='topk', scope='query', topk=4)"],
                         ids=["tau1", "topk-all"])
def test_degenerate_settings_are_full_attention(spec):
    assert_selection_covering_everything_is_mha(spec, False)


@pytest.mark.parametrize("kw,match", [
    ({}, "grid"),
    ({"grid": (4, 6, 6), "partition": "2d", "block_2d": (4, 4)}, "must divide"),
    ({"grid": (4, 8, 8), "partition": "4d"}, "partition"),
    ({"grid": (4, 8, 8), "tau": 2}, "tau"),
    ({"grid": (4, 8, 8), "layer": -1}, "layer"),
    ({"grid": (4, 8, 8), "scope": "layer"}, "scope"),
], ids=["no-grid", "block", "partition", "tau", "layer", "scope"])
def test_bad_configs_raise_naming_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("vmoba", **{"dim": 16, "heads": 2, **kw})


def test_vmoba_input_must_match_the_grid():
    m = headwise.create("vmoba(grid=(2, 4, 4), block_1d=1)", dim=16, heads=2)
    with pytest.raises(ValueError, match="grid"):
        m(torch.randn(1, 31, 16))


def test_vmoba_layers_cycle_through_the_partitions():
    parts = [headwise.create(f"vmoba(grid=(4, 8, 8), layer={layer})", dim=16, heads=2).config.partition
             for layer in range(6)]
    assert parts == ["1d", "2d", "3d"] * 2
    m = headwise.create("vmoba(grid=(4, 8, 8), layer=1, partition='3d', block_3d=(2, 4, 4))", dim=16, heads=2)
    assert m.config.partition == "3d" and m.config.block == (2, 4, 4)
