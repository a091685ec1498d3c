"""msa_conv (with TiC's cyclic shift and inter-pooling) against naive_mha / naive_msa_conv (float64, forward and
gradients), and its config errors."""

import math

import pytest
import torch

import headwise
from headwise.patterns import Causal, ConvWindow
from headwise.patterns.structured import CyclicShift, directional_shifts
from headwise.variants.mha import naive_mha
from headwise.variants.msa_conv import MSAConv, naive_cell_average, naive_msa_conv, pool_grid
from common import ABS_TOL, F64, assert_loads_old_checkpoint, assert_same_forward_and_grads, fused_checkpoint


@pytest.mark.parametrize("kw", [{}, {"kv_heads": 2}], ids=["mha", "gqa"])
def test_msa_conv_matches_naive_forward_and_backward(kw):
    torch.manual_seed(1)
    m = MSAConv(16, 4, grid=(9, 11), kernel_size=5, dilation=(1, 2), backend="blocksparse", **kw).to(F64)
    x = torch.randn(2, 99, 16, dtype=F64, requires_grad=True)  # odd grid: cropped windows
    wrt = [x, *m.parameters()]
    ref = naive_mha(m, x, pattern=ConvWindow((9, 11), 5, (1, 2)))
    assert_same_forward_and_grads(m(x), ref, wrt, ABS_TOL, seed=None)
    assert_same_forward_and_grads(m(x), naive_msa_conv(m, x), wrt, ABS_TOL, seed=None)


def test_causal_intersects_the_window():
    torch.manual_seed(2)
    m = MSAConv(16, 4, grid=(5, 7), shifts=1, causal=True).to(F64)
    x = torch.randn(1, 35, 16, dtype=F64)
    want = naive_mha(m, x, pattern=CyclicShift(ConvWindow((5, 7), 3), directional_shifts(2, 1), heads=4) & Causal())
    torch.testing.assert_close(m(x), want, atol=1e-10, rtol=0)


def test_create_from_spec_and_defaults():
    c = headwise.create("msa_conv(grid=(5, 7), kernel_size=5)", dim=32, heads=4)
    assert isinstance(c, MSAConv) and c.pattern == ConvWindow((5, 7), 5)
    assert c(torch.randn(1, 35, 32)).shape == (1, 35, 32)


# ---- TiC: multi-directional cyclic shift and inter-pooling -----------------------------------------------------
def _roll_tokens(x, grid, shift):
    """``x`` ``[B, N, C]`` with the grid rolled by ``shift`` (torch.roll semantics), flattened back."""
    B, N, C = x.shape
    dims = tuple(range(1, len(grid) + 1))
    return x.reshape(B, *grid, C).roll(tuple(shift), dims).reshape(B, N, C)


@pytest.mark.parametrize("shifts", [((0, 0),), ((0, 0),) * 4, ((5, 7),)], ids=["zero", "zero-4-groups", "full-turn"])
def test_msa_conv_zero_shift_is_the_plain_module(shifts):
    torch.manual_seed(2)
    plain = MSAConv(16, 4, grid=(5, 7), kernel_size=3, backend="blocksparse").to(F64)
    shifted = MSAConv(16, 4, grid=(5, 7), kernel_size=3, shifts=shifts, backend="blocksparse").to(F64)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(2, 35, 16, dtype=F64)
    assert torch.equal(shifted(x), plain(x))


@pytest.mark.parametrize("grid,shift", [((5, 7), (2, -3)), ((11,), (4,)), ((3, 4, 5), (1, 0, -2))],
                         ids=["5x7-s2x-3", "1d-11-s4", "3x4x5"])
def test_msa_conv_one_shift_is_roll_around_the_plain_module(grid, shift):
    torch.manual_seed(3)
    plain = MSAConv(12, 3, grid=grid, kernel_size=3, dilation=1, backend="blocksparse").to(F64)
    shifted = MSAConv(12, 3, grid=grid, kernel_size=3, shifts=(shift,), backend="blocksparse").to(F64)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(2, math.prod(grid), 12, dtype=F64, requires_grad=True)
    ref = _roll_tokens(plain(_roll_tokens(x, grid, shift)), grid, [-s for s in shift])
    assert_same_forward_and_grads(shifted(x), ref, [x, *shifted.parameters()], ABS_TOL, seed=None,
                                  ref_wrt=[x, *plain.parameters()])


def test_msa_conv_directional_shifts_roll_each_head_group():
    """Four head groups, each rolled its own way: per head, the window mask on rolled coordinates."""
    torch.manual_seed(4)
    grid = (5, 7)
    m = MSAConv(16, 8, grid=grid, kernel_size=3, dilation=(1, 2), shifts=2, backend="blocksparse").to(F64)
    assert m.pattern.shifts == ((2, 0), (3, 0), (0, 2), (0, 5))  # +-2 per dim, modulo the grid
    window = ConvWindow(grid, 3, (1, 2)).dense_mask(35, 35)[0]  # (N, N)
    ids = torch.arange(35.0, dtype=F64).view(1, 35, 1)
    masks = []
    for h in range(8):
        at = _roll_tokens(ids, grid, directional_shifts(2, 2)[h // 2]).view(35).long()  # original token per rolled pos
        r = torch.argsort(at)  # original token -> rolled position
        masks.append(window[r][:, r])
    masks = torch.stack(masks)  # (H, N, N)
    x = torch.randn(2, 35, 16, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_msa_conv(m, x, mask=masks), [x, *m.parameters()], ABS_TOL, seed=None)


@pytest.mark.parametrize("grid,cell,shifts,kw", [((6, 9), (2, 3), None, {}), ((6, 9), (6, 9), None, {}),
                                                 ((12,), (4,), None, {}), ((4, 6), (2, 2), 1, {}),
                                                 ((5, 7), (5, 1), 1, {"kv_heads": 2})],
                         ids=["6x9-cell2x3", "6x9-one-cell", "1d-12-cell4", "4x6-cell2-shift1", "5x7-cell5x1-gqa"])
def test_msa_conv_inter_pooling_matches_naive(grid, cell, shifts, kw):
    torch.manual_seed(5)
    m = MSAConv(16, 4, grid=grid, kernel_size=3, pool=cell, shifts=shifts, backend="blocksparse", **kw).to(F64)
    x = torch.randn(2, math.prod(grid), 16, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_msa_conv(m, x), [x, *m.parameters()], ABS_TOL, seed=None)
    assert m.caps.causal == "none" and not m.caps.softmax


@pytest.mark.parametrize("grid,cell", [((4, 6), (2, 3)), ((12,), (4,)), ((2, 4, 6), (1, 2, 3))])
def test_pool_grid_is_the_cell_average(grid, cell):
    t = torch.randn(2, 3, math.prod(grid), 5, dtype=F64)
    torch.testing.assert_close(pool_grid(t, grid, cell), naive_cell_average(grid, cell) @ t, rtol=1e-12, atol=1e-12)


def test_pool_grid_averages_cells():
    t = torch.arange(24.0, dtype=F64).view(1, 1, 24, 1)  # a 4 x 6 grid, value = token id
    cells = pool_grid(t, (4, 6), (2, 3))[0, 0, :, 0]
    assert cells.tolist() == [(0 + 1 + 2 + 6 + 7 + 8) / 6, (3 + 4 + 5 + 9 + 10 + 11) / 6,
                              (12 + 13 + 14 + 18 + 19 + 20) / 6, (15 + 16 + 17 + 21 + 22 + 23) / 6]


def test_msa_conv_tic_options_from_spec():
    m = headwise.create("msa_conv(grid=(8, 8), shifts=2, pool=4)", dim=32, heads=4)
    assert isinstance(m.pattern, CyclicShift) and m.config.pool == (4, 4)
    assert m(torch.randn(1, 64, 32)).shape == (1, 64, 32)
    assert MSAConv(32, 4, grid=(8, 8)).pattern == ConvWindow((8, 8), 3)  # both off by default


def test_older_checkpoint_keys_load():
    """Checkpoints of the MultiHeadAttention-wrapping module (``attn.q_proj``, ``attn.kv_proj``, ...) still load."""
    torch.manual_seed(6)
    m = MSAConv(16, 2, grid=(4, 4), pool=2)
    fresh = MSAConv(16, 2, grid=(4, 4), pool=2)
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict(), prefix="attn."), m, torch.randn(1, 16, 16))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(shifts=2, heads=3), "heads"),
    (dict(shifts=((1, 2, 3),)), "shift"),
    (dict(shifts=True), "shifts"),
    (dict(pool=3), "pool"),
    (dict(pool=0), "pool"),
    (dict(pool=(2, 2, 2)), "pool"),
    (dict(shifts=0), "amount"),
    (dict(pool=2, causal=True), "no causal mode with inter-pooling"),
    (dict(kernel_size=2), "kernel_size"),
    (dict(heads=5), "dim"),
    (dict(grid=None), "grid"),
], ids=["groups-vs-heads", "shift-length", "shift-bool", "pool-divides", "pool-zero", "pool-dims", "shift-zero-int",
        "pool-causal", "conv-even", "dim-heads", "grid-required"])
def test_msa_conv_bad_options_raise(kwargs, needle):
    kwargs = {"heads": 4, "grid": (8, 8), **kwargs}
    heads = kwargs.pop("heads")
    with pytest.raises(ValueError, match=needle):
        MSAConv(24, heads, **kwargs)


def test_wrong_token_count_raises():
    m = MSAConv(16, 2, grid=(8, 8))
    with pytest.raises(ValueError, match="prod"):
        m(torch.randn(1, 63, 16))
