"""MEDUSA multi-scale heads against MultiHeadAttention with the same weights and the float64 reference
(naive_multiscale_heads: naive_mha with the other head groups read out as zeros, then pooled)."""

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.mha import naive_mha
from headwise.variants.multiscale_heads import MultiScaleHeads, naive_multiscale_heads
from common import (
    assert_all_params_get_grads,
    assert_loads_old_checkpoint,
    assert_same_forward_and_grads,
    fused_checkpoint,
    mha_like,
    rand,
)


def test_multiscale_heads_one_scale_is_mha():
    torch.manual_seed(0)
    m = MultiScaleHeads(16, 4, scales=1).double()
    x = rand(2, 25, 16)
    (y,) = m(x)
    torch.testing.assert_close(y, mha_like(m)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("heads,scales,grid", [(4, 2, (4, 6)), (6, 3, (8, 4)), (4, 4, (8, 8))],
                         ids=lambda v: str(v))
def test_multiscale_heads_groups_are_pooled_slices_of_mha(heads, scales, grid):
    """Scale s = AvgPool_{2^s}(MHA with every other head group's output columns zeroed)."""
    torch.manual_seed(0)
    C = 2 * heads
    m = MultiScaleHeads(C, heads, scales=scales).double()
    h, w = grid
    x = rand(2, h * w, C)
    ys = m(x, grid=grid)
    G, D = heads // scales, m.head_dim
    for s, y in enumerate(ys):
        ref = mha_like(m)
        with torch.no_grad():
            keep = torch.zeros(heads * D, dtype=torch.bool)
            keep[s * G * D:(s + 1) * G * D] = True
            ref.out_proj.weight[:, ~keep] = 0.0
        full = naive_mha(ref, x, x)  # (B, N, C)
        f = 2 ** s
        pooled = F.avg_pool2d(full.transpose(1, 2).reshape(2, C, h, w), f).flatten(2).transpose(1, 2)
        assert y.shape == (2, h * w // f ** 2, C)
        torch.testing.assert_close(y, pooled, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kv_heads,grid,causal", [(2, (4, 6), False), (1, (2, 2), True), (4, (6, 10), True)],
                         ids=lambda v: str(v))
def test_multiscale_heads_matches_reference_forward_and_backward(kv_heads, grid, causal):
    """Output and gradients (input and every parameter) against naive_multiscale_heads; the grid from the config."""
    torch.manual_seed(0)
    m = MultiScaleHeads(16, 4, kv_heads=kv_heads, scales=2, grid=grid, causal=causal).double()
    x = rand(2, grid[0] * grid[1], 16, requires_grad=True)
    # every scale against its reference; the gradients through scale s projected on weights from seed 1 + s
    assert_same_forward_and_grads(m(x), naive_multiscale_heads(m, x), [x, *m.parameters()], seed=1)


def test_multiscale_heads_config_grid_and_forward_override():
    torch.manual_seed(0)
    m = MultiScaleHeads(8, 2, scales=2, grid=(2, 8)).double()
    x = rand(1, 16, 8)
    assert m(x)[1].shape == (1, 4, 8)  # config grid (2, 8): pooled to (1, 4)
    square = m(x, grid=(4, 4))  # per-call override
    for y, ref in zip(square, naive_multiscale_heads(m, x, grid=(4, 4)), strict=True):
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(square[0], m(x)[0])  # full resolution does not depend on the grid


def test_multiscale_heads_loads_checkpoints_of_the_body_submodule():
    """Before the move onto the base the projections were `body.q_proj`, `body.kv_proj`, `body.out_proj`."""
    torch.manual_seed(0)
    m = MultiScaleHeads(16, 4, kv_heads=2).double()
    fresh = MultiScaleHeads(16, 4, kv_heads=2).double()
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict(), prefix="body."), m, rand(2, 16, 16))


def test_multiscale_heads_grads_and_errors():
    m = headwise.create("multiscale_heads", dim=16, heads=4)
    assert_all_params_get_grads(m, m(torch.randn(2, 16, 16)))
    with pytest.raises(ValueError, match="heads must be divisible by scales, got heads=4 scales=3"):
        MultiScaleHeads(16, 4, scales=3)
    with pytest.raises(ValueError, match="not a square grid"):
        m(torch.randn(1, 15, 16))
    with pytest.raises(ValueError, match=r"grid=\(3, 6\) must be divisible by 2\*\*\(scales-1\)=2"):
        m(torch.randn(1, 18, 16), grid=(3, 6))
    with pytest.raises(ValueError, match=r"grid=\(7, 7\) must be divisible by 2\*\*\(scales-1\)=2 for scales=2"):
        MultiScaleHeads(16, 4, grid=(7, 7))  # the arena's 7 x 7 patch grid: refused when built
    with pytest.raises(ValueError, match=r"grid must be a tuple of 2 positive ints, got grid=\(4,\)"):
        MultiScaleHeads(16, 4, grid=(4,))
    with pytest.raises(ValueError, match=r"grid=\(2, 4\) does not multiply to N=16"):
        MultiScaleHeads(16, 4, grid=(2, 4))(torch.randn(1, 16, 16))
    assert len(MultiScaleHeads(16, 4, scales=1, grid=(7, 7))(torch.randn(1, 49, 16))) == 1  # one scale: any grid
