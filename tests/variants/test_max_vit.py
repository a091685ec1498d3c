"""max_vit against its reference naive_max_vit (float64, forward and gradients), defaults and config errors."""

import math

import pytest
import torch

import headwise
from headwise.variants.max_vit import MaxViTAttention, naive_max_vit
from common import ABS_TOL, F64, assert_loads_old_checkpoint, assert_same_forward_and_grads, fused_checkpoint


@pytest.mark.parametrize("grid,window,grid_size", [((6, 9), (2, 3), (3, 3)), ((8, 8), 4, 2), ((3, 9), 3, (1, 3))],
                         ids=["6x9-P2x3-G3x3", "8x8-P4-G2", "3x9-P3-G1x3"])
def test_max_vit_matches_naive_forward_and_backward(grid, window, grid_size):
    torch.manual_seed(0)
    m = headwise.create("max_vit", dim=12, heads=3, grid=grid, window=window, grid_size=grid_size,
                        backend="blocksparse").to(F64)
    x = torch.randn(2, math.prod(grid), 12, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_max_vit(m, x), [x, *m.parameters()], ABS_TOL, seed=None)


def test_max_vit_with_shared_key_value_heads_matches_naive():
    torch.manual_seed(1)
    m = MaxViTAttention(16, 4, kv_heads=2, grid=(4, 6), window=2, grid_size=2).to(F64)
    x = torch.randn(1, 24, 16, dtype=F64)
    torch.testing.assert_close(m(x), naive_max_vit(m, x), atol=1e-10, rtol=0)


def test_create_from_spec_and_defaults():
    m = headwise.create("max_vit(grid=(14, 14))", dim=32, heads=4)
    assert isinstance(m, MaxViTAttention) and m.config.window == 7 and m.config.grid_size == 7
    assert m(torch.randn(1, 196, 32)).shape == (1, 196, 32)


def test_older_checkpoint_keys_load():
    """Checkpoints of the MultiHeadAttention-based module (``block_attn.kv_proj.*``) still load."""
    torch.manual_seed(2)
    m = MaxViTAttention(16, 2, grid=(4, 4), window=2, grid_size=2)
    fresh = MaxViTAttention(16, 2, grid=(4, 4), window=2, grid_size=2)
    old = fused_checkpoint(m.state_dict(), within=("block_attn", "grid_attn"))
    assert_loads_old_checkpoint(fresh, old, m, torch.randn(1, 16, 16))


@pytest.mark.parametrize("make,needle", [
    (lambda: MaxViTAttention(32, 4, grid=(14, 14), window=4), "window"),
    (lambda: MaxViTAttention(32, 4, grid=(14, 14), grid_size=3), "grid_size"),
    (lambda: MaxViTAttention(0, 4, grid=(14, 14)), "dim"),
    (lambda: MaxViTAttention(32, 4), "grid"),
], ids=["window-divides", "grid-size-divides", "dim", "grid-required"])
def test_bad_config_raises_naming_the_argument(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_wrong_token_count_raises():
    mv = MaxViTAttention(16, 2, grid=(8, 8), window=4, grid_size=2)
    with pytest.raises(ValueError, match="prod"):
        mv(torch.randn(1, 65, 16))
