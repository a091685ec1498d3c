"""max_vit, halo and msa_conv (with TiC's cyclic shift and inter-pooling) against hand-written float64
computations, and their config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.patterns import ConvWindow, Halo, MaxViTBlock, MaxViTGrid
from headwise.patterns.structured import CyclicShift, directional_shifts
from headwise.variants.structured import HaloAttention, MaxViTAttention, MSAConv, pool_grid

F64 = torch.float64


def naive_pattern_mha(m, x, mask, extra_keys=None):
    """One softmax attention with module ``m``'s projections (a MultiHeadAttention), a dense ``[N, M]`` or
    per-head ``[H, N, M]`` mask; ``extra_keys(k, v) -> (k, v)`` may append keys (the mask covers them)."""
    B, N, _ = x.shape
    H, D = m.heads, m.head_dim
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    k, v = F.linear(x, m.kv_proj.weight, m.kv_proj.bias).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
    if extra_keys is not None:
        k, v = extra_keys(k, v)  # (B, H, M, D)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, -math.inf)  # (B, H, N, M)
    out = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias)  # (B, N, C)


def naive_max_vit(m, x):
    n = x.shape[1]
    grid = m.config.grid
    x = x + naive_pattern_mha(m.block_attn, m.norm_block(x), MaxViTBlock(grid, m.config.window).dense_mask(n, n)[0])
    return x + naive_pattern_mha(m.grid_attn, m.norm_grid(x), MaxViTGrid(grid, m.config.grid_size).dense_mask(n, n)[0])


@pytest.mark.parametrize("grid,window,grid_size", [((6, 9), (2, 3), (3, 3)), ((8, 8), 4, 2)],
                         ids=["6x9-P2x3-G3x3", "8x8-P4-G2"])
def test_max_vit_matches_naive_forward_and_backward(grid, window, grid_size):
    torch.manual_seed(0)
    m = headwise.create("max_vit", dim=12, heads=3, grid=grid, window=window, grid_size=grid_size,
                        backend="blocksparse").to(F64)
    x = torch.randn(2, math.prod(grid), 12, dtype=F64, requires_grad=True)
    out, ref = m(x), naive_max_vit(m, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, *m.parameters()])
    want = torch.autograd.grad((ref * g).sum(), [x, *m.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("module,pattern", [
    (lambda: HaloAttention(16, 4, grid=(9, 11), block=4, halo=1, backend="blocksparse"), Halo((9, 11), 4, 1)),
    (lambda: MSAConv(16, 4, grid=(9, 11), kernel_size=5, dilation=(1, 2), backend="blocksparse"),
     ConvWindow((9, 11), 5, (1, 2))),
], ids=["halo-9x11-b4-h1", "msa_conv-9x11-k5-d1x2"])
def test_single_pattern_modules_match_naive_forward_and_backward(module, pattern):
    torch.manual_seed(1)
    m = module().to(F64)  # odd grid: partial last blocks, cropped windows
    x = torch.randn(2, 99, 16, dtype=F64, requires_grad=True)
    out = m(x)
    ref = naive_pattern_mha(m.attn, x, pattern.dense_mask(99, 99)[0])
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), [x, *m.parameters()]),
                    torch.autograd.grad((ref * g).sum(), [x, *m.parameters()])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_create_from_spec_and_defaults():
    m = headwise.create("max_vit(grid=(14, 14))", dim=32, heads=4)
    assert isinstance(m, MaxViTAttention) and m.config.window == 7 and m.config.grid_size == 7
    h = headwise.create("halo(grid=(16, 16))", dim=32, heads=4)
    assert isinstance(h, HaloAttention) and (h.config.block, h.config.halo) == (8, 3)
    assert h(torch.randn(1, 256, 32)).shape == (1, 256, 32)
    c = headwise.create("msa_conv(grid=(5, 7), kernel_size=5)", dim=32, heads=4)
    assert isinstance(c, MSAConv) and c.config.pattern == ConvWindow((5, 7), 5)
    assert c(torch.randn(1, 35, 32)).shape == (1, 35, 32)


@pytest.mark.parametrize("make,needle", [
    (lambda: MaxViTAttention(32, 4, grid=(14, 14), window=4), "window"),
    (lambda: MaxViTAttention(32, 4, grid=(14, 14), grid_size=3), "grid_size"),
    (lambda: MaxViTAttention(0, 4, grid=(14, 14)), "dim"),
    (lambda: HaloAttention(32, 4, grid=(4, 4), block=8), "block"),
    (lambda: HaloAttention(32, 4, grid=(16, 16), halo=-2), "halo"),
    (lambda: MSAConv(32, 4, grid=(16, 16), kernel_size=2), "kernel_size"),
    (lambda: MSAConv(32, 3, grid=(16, 16)), "dim"),
], ids=["window-divides", "grid-size-divides", "dim", "block-exceeds", "halo-negative", "conv-even", "dim-heads"])
def test_bad_config_raises_naming_the_argument(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_wrong_token_count_raises():
    m = HaloAttention(16, 2, grid=(8, 8), block=4, halo=1)
    with pytest.raises(ValueError, match="prod"):
        m(torch.randn(1, 63, 16))
    mv = MaxViTAttention(16, 2, grid=(8, 8), window=4, grid_size=2)
    with pytest.raises(ValueError, match="prod"):
        mv(torch.randn(1, 65, 16))


# ---- TiC: multi-directional cyclic shift and inter-pooling -----------------------------------------------------
def _roll_tokens(x, grid, shift):
    """``x`` ``[B, N, C]`` with the grid rolled by ``shift`` (torch.roll semantics), flattened back."""
    B, N, C = x.shape
    dims = tuple(range(1, len(grid) + 1))
    return x.reshape(B, *grid, C).roll(tuple(shift), dims).reshape(B, N, C)


def _assert_same_forward_and_grads(m, out, ref, x, ref_module=None):
    """Forward and the gradients to ``x`` and every parameter agree (``ref`` built on ``ref_module``'s weights)."""
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x, *m.parameters()])
    want = torch.autograd.grad((ref * g).sum(), [x, *(ref_module or m).parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


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
    _assert_same_forward_and_grads(shifted, shifted(x), ref, x, ref_module=plain)


def test_msa_conv_directional_shifts_roll_each_head_group():
    """Four head groups, each rolled its own way: per head, the window mask on rolled coordinates."""
    torch.manual_seed(4)
    grid = (5, 7)
    m = MSAConv(16, 8, grid=grid, kernel_size=3, dilation=(1, 2), shifts=2, backend="blocksparse").to(F64)
    assert m.config.pattern.shifts == ((2, 0), (3, 0), (0, 2), (0, 5))  # +-2 per dim, modulo the grid
    window = ConvWindow(grid, 3, (1, 2)).dense_mask(35, 35)[0]  # (N, N)
    ids = torch.arange(35.0, dtype=F64).view(1, 35, 1)
    masks = []
    for h in range(8):
        at = _roll_tokens(ids, grid, directional_shifts(2, 2)[h // 2]).view(35).long()  # original token per rolled pos
        r = torch.argsort(at)  # original token -> rolled position
        masks.append(window[r][:, r])
    masks = torch.stack(masks)  # (H, N, N)
    x = torch.randn(2, 35, 16, dtype=F64, requires_grad=True)
    _assert_same_forward_and_grads(m, m(x), naive_pattern_mha(m.attn, x, masks), x)


def _naive_cells(grid, cell):
    """``(M, N)`` float64 averaging matrix of the non-overlapping cells, written with explicit coordinates."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij"), -1).reshape(-1, len(grid))
    cell_of = torch.zeros(len(coords), dtype=torch.long)
    for d, (g, c) in enumerate(zip(grid, cell)):
        cell_of = cell_of * (g // c) + coords[:, d] // c
    onehot = F.one_hot(cell_of).T.double()  # (M, N)
    return onehot / onehot.sum(1, keepdim=True)


@pytest.mark.parametrize("grid,cell,shifts", [((6, 9), (2, 3), None), ((6, 9), (6, 9), None), ((12,), (4,), None),
                                              ((4, 6), (2, 2), 1)],
                         ids=["6x9-cell2x3", "6x9-one-cell", "1d-12-cell4", "4x6-cell2-shift1"])
def test_msa_conv_inter_pooling_matches_naive(grid, cell, shifts):
    torch.manual_seed(5)
    m = MSAConv(16, 4, grid=grid, kernel_size=3, pool=cell, shifts=shifts, backend="blocksparse").to(F64)
    n = math.prod(grid)
    avg = _naive_cells(grid, cell)  # (M, N)
    window = m.config.pattern.dense_mask(n, n)  # (1 or H, N, N)
    mask = torch.cat([window.expand(4, n, n), torch.ones(4, n, avg.shape[0], dtype=torch.bool)], -1)  # (H, N, N+M)
    extra = lambda k, v: (torch.cat([k, avg @ k], 2), torch.cat([v, avg @ v], 2))  # noqa: E731
    x = torch.randn(2, n, 16, dtype=F64, requires_grad=True)
    _assert_same_forward_and_grads(m, m(x), naive_pattern_mha(m.attn, x, mask, extra), x)


def test_pool_grid_averages_cells():
    t = torch.arange(24.0, dtype=F64).view(1, 1, 24, 1)  # a 4 x 6 grid, value = token id
    cells = pool_grid(t, (4, 6), (2, 3))[0, 0, :, 0]
    assert cells.tolist() == [(0 + 1 + 2 + 6 + 7 + 8) / 6, (3 + 4 + 5 + 9 + 10 + 11) / 6,
                              (12 + 13 + 14 + 18 + 19 + 20) / 6, (15 + 16 + 17 + 21 + 22 + 23) / 6]


def test_msa_conv_tic_options_from_spec():
    m = headwise.create("msa_conv(grid=(8, 8), shifts=2, pool=4)", dim=32, heads=4)
    assert isinstance(m.config.pattern, CyclicShift) and m.config.pool == (4, 4)
    assert m(torch.randn(1, 64, 32)).shape == (1, 64, 32)
    assert MSAConv(32, 4, grid=(8, 8)).config.pattern == ConvWindow((8, 8), 3)  # both off by default


@pytest.mark.parametrize("kwargs,needle", [
    (dict(shifts=2, heads=3), "heads"),
    (dict(shifts=((1, 2, 3),)), "shift"),
    (dict(shifts=True), "shifts"),
    (dict(pool=3), "pool"),
    (dict(pool=0), "pool"),
    (dict(pool=(2, 2, 2)), "pool"),
    (dict(shifts=0), "amount"),
], ids=["groups-vs-heads", "shift-length", "shift-bool", "pool-divides", "pool-zero", "pool-dims", "shift-zero-int"])
def test_msa_conv_bad_tic_options_raise(kwargs, needle):
    kwargs = {"heads": 4, **kwargs}
    heads = kwargs.pop("heads")
    with pytest.raises(ValueError, match=needle):
        MSAConv(24, heads, grid=(8, 8), **kwargs)
