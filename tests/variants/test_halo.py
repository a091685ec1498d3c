"""halo against naive_mha with the Halo pattern (float64, forward and gradients), defaults and config errors."""

import pytest
import torch

import headwise
from headwise.patterns import Causal, Halo
from headwise.variants.halo import HaloAttention
from headwise.variants.mha import naive_mha
from common import ABS_TOL, F64, assert_loads_old_checkpoint, assert_same_forward_and_grads, fused_checkpoint


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2}], ids=["mha", "gqa"])
def test_halo_matches_naive_forward_and_backward(kw):
    torch.manual_seed(1)
    m = HaloAttention(16, 4, grid=(9, 11), block=4, halo=1, backend="blocksparse", **kw).to(F64)  # odd grid:
    x = torch.randn(2, 99, 16, dtype=F64, requires_grad=True)  # partial last blocks, cropped windows
    out = m(x)
    ref = naive_mha(m, x, pattern=Halo((9, 11), 4, 1))
    assert_same_forward_and_grads(out, ref, [x, *m.parameters()], ABS_TOL, seed=None)


def test_causal_intersects_the_halo():
    torch.manual_seed(2)
    m = HaloAttention(16, 4, grid=(5, 7), block=3, halo=1, causal=True).to(F64)
    x = torch.randn(1, 35, 16, dtype=F64)
    torch.testing.assert_close(m(x), naive_mha(m, x, pattern=Halo((5, 7), 3, 1) & Causal()), atol=1e-10, rtol=0)


def test_create_from_spec_and_defaults():
    h = headwise.create("halo(grid=(16, 16))", dim=32, heads=4)
    assert isinstance(h, HaloAttention) and (h.config.block, h.config.halo) == (8, 3)
    assert h.pattern == Halo((16, 16), 8, 3)
    assert h(torch.randn(1, 256, 32)).shape == (1, 256, 32)


def test_older_checkpoint_keys_load():
    """Checkpoints of the MultiHeadAttention-wrapping module (``attn.q_proj``, ``attn.kv_proj``, ...) still load."""
    torch.manual_seed(3)
    m = HaloAttention(16, 2, grid=(4, 4), block=2, halo=1)
    fresh = HaloAttention(16, 2, grid=(4, 4), block=2, halo=1)
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict(), prefix="attn."), m, torch.randn(1, 16, 16))


@pytest.mark.parametrize("make,needle", [
    (lambda: HaloAttention(32, 4, grid=(4, 4), block=8), "block"),
    (lambda: HaloAttention(32, 4, grid=(16, 16), halo=-2), "halo"),
    (lambda: HaloAttention(32, 4), "grid"),
], ids=["block-exceeds", "halo-negative", "grid-required"])
def test_bad_config_raises_naming_the_argument(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_wrong_token_count_raises():
    m = HaloAttention(16, 2, grid=(8, 8), block=4, halo=1)
    with pytest.raises(ValueError, match="prod"):
        m(torch.randn(1, 63, 16))
