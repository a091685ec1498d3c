"""max_vit and halo modules against hand-written float64 computations, and their config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.patterns import ConvWindow, Halo, MaxViTBlock, MaxViTGrid
from headwise.variants.structured import HaloAttention, MaxViTAttention, MSAConv

F64 = torch.float64


def naive_pattern_mha(m, x, mask):
    """One softmax attention with module ``m``'s projections (a MultiHeadAttention), a dense ``[N, N]`` mask."""
    B, N, _ = x.shape
    H, D = m.heads, m.head_dim
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    k, v = F.linear(x, m.kv_proj.weight, m.kv_proj.bias).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
    s = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, -math.inf)  # (B, H, N, N)
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
