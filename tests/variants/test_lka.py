"""LKA, ULSAM, spectral gating, NiNformer's gating unit and the multi-head scan against float64 computations
written out here (delta kernels, per-subspace loops, circular convolution, the mixer equations, the step-by-step
selective scan)."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.vision import (
    ROUTES,
    LargeKernelAttention,
    MixerGatingUnit,
    MultiHeadScan,
    SpectralGating,
    SubspaceAttention,
    chunk_selective_scan,
    recurrent_selective_scan,
    scan_routes,
)

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_all_params_get_grads(module, out):
    """Every trainable parameter gets a finite, non-zero gradient from a random projection of ``out``."""
    loss = (out * rand(*out.shape, seed=1, dtype=out.dtype)).sum()
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, _), g in zip(params.items(), grads):
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all(), f"{name} has a non-finite gradient"
        assert g.abs().max() > 0, f"{name} has an all-zero gradient"


# ----------------------------------------------------------------------------------------------------------- lka


@pytest.mark.parametrize("kernel_size,dilation,local,far", [(21, 3, 5, 7), (7, 2, 3, 5), (5, 1, 1, 5)],
                         ids=["K21-d3", "K7-d2", "K5-d1"])
def test_lka_decomposition_sizes(kernel_size, dilation, local, far):
    m = LargeKernelAttention(8, kernel_size=kernel_size, dilation=dilation)
    assert (m.local_size, m.dilated_size) == (local, far)
    assert m.conv_spatial.dilation == (dilation, dilation)


@pytest.mark.parametrize("H,W", [(1, 1), (9, 7), (16, 16)], ids=lambda v: str(v))
def test_lka_identity_convolutions_square_the_input(H, W):
    """With delta kernels and an identity 1x1 convolution the attention map is x itself: output x * x."""
    m = LargeKernelAttention(6).double()
    with torch.no_grad():
        for conv in (m.conv0, m.conv_spatial):
            conv.weight.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
            conv.bias.zero_()
        m.conv1.weight.copy_(torch.eye(6)[:, :, None, None])
        m.conv1.bias.zero_()
    x = rand(2, 6, H, W)
    torch.testing.assert_close(m(x), x * x, rtol=1e-12, atol=1e-12)


def test_lka_receptive_field_is_the_large_kernel():
    """The decomposed kernel (K=21, d=3) spans (2d-1) + d*(ceil(K/d)-1) = 5 + 3*6 = 23 >= K pixels per side."""
    m = LargeKernelAttention(1).double()
    with torch.no_grad():
        for conv in (m.conv0, m.conv_spatial, m.conv1):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    x = torch.zeros(1, 1, 41, 41, dtype=F64, requires_grad=True)
    attn = m.conv1(m.conv_spatial(m.conv0(x)))
    (g,) = torch.autograd.grad(attn[0, 0, 20, 20], x)
    rows = g[0, 0].abs().sum(1).nonzero().squeeze(1)
    assert rows.max() - rows.min() + 1 == 5 + 3 * (7 - 1)


def test_lka_shapes_and_grads():
    m = headwise.create("lka(kernel_size=7, dilation=2)", dim=4)
    out = m(torch.randn(2, 4, 5, 9))
    assert out.shape == (2, 4, 5, 9)
    assert_all_params_get_grads(m, out)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=8, kernel_size=20), "kernel_size must be an odd int"),
    (dict(dim=8, kernel_size=7, dilation=9), "dilation must not exceed kernel_size"),
    (dict(dim=0), "dim must be a positive int"),
], ids=["even-kernel", "dilation-too-big", "dim-0"])
def test_lka_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LargeKernelAttention(**kwargs)


def test_lka_bad_input():
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\] with C = dim = 8"):
        LargeKernelAttention(8)(torch.randn(2, 10, 8))


# --------------------------------------------------------------------------------------------------------- ulsam


@pytest.mark.parametrize("C,g,H,W", [(8, 1, 1, 1), (8, 4, 7, 5), (12, 3, 9, 9), (16, 16, 4, 6)],
                         ids=lambda v: str(v))
def test_ulsam_matches_per_subspace_loop(C, g, H, W):
    torch.manual_seed(0)
    m = SubspaceAttention(C, groups=g).double()
    x = rand(2, C, H, W).requires_grad_()
    out, ref = m(x), m.naive_forward(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    wrt = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out.sum() + (out ** 2).sum(), wrt),
                    torch.autograd.grad(ref.sum() + (ref ** 2).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ulsam_attention_map_is_a_spatial_softmax():
    """Per subspace, out - x = A * x with A >= 0 summing to 1 over positions: recover A from a constant input."""
    m = SubspaceAttention(4, groups=2).double()
    x = torch.ones(1, 4, 5, 6, dtype=F64)
    a = m(x) - x  # (1, 4, 5, 6): A_n broadcast over the subspace's channels
    torch.testing.assert_close(a.sum((-1, -2)), torch.ones(1, 4, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[:, 0], a[:, 1])


def test_ulsam_grads_and_bad_config():
    m = headwise.create("ulsam(groups=2)", dim=6)
    assert_all_params_get_grads(m, m(torch.randn(2, 6, 5, 5)))
    with pytest.raises(ValueError, match="dim must be divisible by groups, got dim=6 groups=4"):
        SubspaceAttention(6, groups=4)


# ------------------------------------------------------------------------------------------------------ spectral


def naive_circular_conv(x, kernel, h, w):
    """``y[i, j] = sum_{a, b} kernel[a, b] x[(i - a) % h, (j - b) % w]`` per channel; x ``[B, h*w, C]``."""
    B, N, C = x.shape
    grid = x.view(B, h, w, C)
    y = torch.zeros_like(grid)
    for a in range(h):
        for b in range(w):
            y = y + kernel[a, b] * torch.roll(grid, shifts=(a, b), dims=(1, 2))
    return y.reshape(B, N, C)


@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (4, 4), (6, 7)], ids=lambda v: str(v))
def test_spectral_all_ones_filter_is_identity(h, w):
    m = SpectralGating(5, grid=(h, w)).double()
    with torch.no_grad():
        m.filter.zero_()
        m.filter[..., 0] = 1.0
    x = rand(2, h * w, 5)
    torch.testing.assert_close(m(x), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("h,w", [(3, 5), (4, 4), (6, 7)], ids=lambda v: str(v))
def test_spectral_filter_is_a_circular_convolution(h, w):
    """A filter that is the unnormalized FFT of a real kernel computes the circular convolution with it."""
    C = 3
    kernel = rand(h, w, C, seed=2)  # (h, w, C)
    m = SpectralGating(C, grid=(h, w)).double()
    with torch.no_grad():
        m.filter.copy_(torch.view_as_real(torch.fft.rfft2(kernel, dim=(0, 1))))
    x = rand(2, h * w, C)
    torch.testing.assert_close(m(x), naive_circular_conv(x, kernel, h, w), rtol=1e-10, atol=1e-10)


def test_spectral_grads_shapes_and_errors():
    m = headwise.create("spectral(grid=(3, 4))", dim=6)
    out = m(torch.randn(2, 12, 6))
    assert out.shape == (2, 12, 6)
    assert_all_params_get_grads(m, out)
    assert SpectralGating(4, grid=5).config.grid == (5, 5)
    with pytest.raises(ValueError, match=r"x must have N = tokens = 12 tokens"):
        m(torch.randn(2, 13, 6))
    with pytest.raises(ValueError, match=r"grid must be \(h, w\) positive ints"):
        SpectralGating(4, grid=(0, 3))
    with pytest.raises(ValueError, match="bad config for variant 'spectral'.*grid"):
        headwise.create("spectral", dim=4)


# ------------------------------------------------------------------------------------------------------ nin_gate


def naive_nin_gate(m, x):
    """u * g with the mixer written out: LN, token MLP on the transposed tokens, residual, LN, channel MLP."""
    def mlp(seq, t):
        return F.linear(F.gelu(F.linear(t, seq[0].weight, seq[0].bias)), seq[3].weight, seq[3].bias)

    u = F.linear(x, m.proj.weight, m.proj.bias)
    t = F.layer_norm(x, (x.shape[-1],), m.token_norm.weight, m.token_norm.bias)
    z = x + mlp(m.token_mlp, t.transpose(1, 2)).transpose(1, 2)
    c = F.layer_norm(z, (x.shape[-1],), m.channel_norm.weight, m.channel_norm.bias)
    return u * (z + mlp(m.channel_mlp, c))


@pytest.mark.parametrize("N,C", [(1, 4), (7, 6), (63, 8)], ids=lambda v: str(v))
def test_nin_gate_matches_equations(N, C):
    torch.manual_seed(0)
    m = MixerGatingUnit(C, tokens=N, token_hidden=5).double()
    with torch.no_grad():  # non-trivial norms
        for ln in (m.token_norm, m.channel_norm):
            ln.weight.normal_()
            ln.bias.normal_()
    x = rand(3, N, C)
    torch.testing.assert_close(m(x), naive_nin_gate(m, x), rtol=1e-12, atol=1e-12)


def test_nin_gate_gate_depends_on_other_tokens():
    """Token mixing: changing token 0 changes the output at token 1 (a per-token layer would not)."""
    m = MixerGatingUnit(4, tokens=5).double()
    x = rand(1, 5, 4)
    y = x.clone()
    y[:, 0] += rand(4, seed=5)  # not a constant shift, which LayerNorm would remove
    assert (m(x)[:, 1] - m(y)[:, 1]).abs().max() > 1e-6


def test_nin_gate_grads_defaults_and_errors():
    m = headwise.create("nin_gate(tokens=9)", dim=4)
    assert m.config.token_hidden == m.config.channel_hidden == 16
    assert_all_params_get_grads(m, m(torch.randn(2, 9, 4)))
    with pytest.raises(ValueError, match=r"x must have N = tokens = 9 tokens"):
        m(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got dropout=1.5"):
        MixerGatingUnit(4, tokens=3, dropout=1.5)
    with pytest.raises(TypeError, match="tokens must be a positive int"):
        MixerGatingUnit(4, tokens=2.5)


# ------------------------------------------------------------------------------------------------ multihead_scan


def scan_inputs(B, K, L, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, L, d, generator=g, dtype=F64)
    delta = F.softplus(torch.randn(B, K, L, d, generator=g, dtype=F64))
    A = -torch.exp(torch.randn(K, d, n, generator=g, dtype=F64))
    Bm = torch.randn(B, K, L, n, generator=g, dtype=F64)
    Cm = torch.randn(B, K, L, n, generator=g, dtype=F64)
    D = torch.randn(K, d, generator=g, dtype=F64)
    return [t.requires_grad_() for t in (x, delta, A, Bm, Cm, D)]


@pytest.mark.parametrize("L,chunk", [(1, 4), (63, 16), (100, 32), (37, 37), (20, 64)],
                         ids=lambda v: str(v))
def test_chunk_selective_scan_matches_recurrent(L, chunk):
    inputs = scan_inputs(2, 3, L, 4, 5)
    out = chunk_selective_scan(*inputs, chunk=chunk)
    ref = recurrent_selective_scan(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = rand(*out.shape, seed=3)
    for a, b in zip(torch.autograd.grad((out * g).sum(), inputs), torch.autograd.grad((ref * g).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_recurrent_selective_scan_first_steps_by_hand():
    """Step 0: h = delta x B, y = C h + D x; step 1 adds the decayed state."""
    x, delta, A, Bm, Cm, D = (t.detach() for t in scan_inputs(1, 1, 2, 1, 1))
    y = recurrent_selective_scan(x, delta, A, Bm, Cm, D)[0, 0, :, 0]
    h0 = delta[0, 0, 0, 0] * x[0, 0, 0, 0] * Bm[0, 0, 0, 0]
    h1 = torch.exp(delta[0, 0, 1, 0] * A[0, 0, 0]) * h0 + delta[0, 0, 1, 0] * x[0, 0, 1, 0] * Bm[0, 0, 1, 0]
    torch.testing.assert_close(y[0], Cm[0, 0, 0, 0] * h0 + D[0, 0] * x[0, 0, 0, 0])
    torch.testing.assert_close(y[1], Cm[0, 0, 1, 0] * h1 + D[0, 0] * x[0, 0, 1, 0])


@pytest.mark.parametrize("family", list(ROUTES))
@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (4, 4)], ids=lambda v: str(v))
def test_scan_routes_are_permutations(family, h, w):
    r = scan_routes(family, h, w)
    assert r.shape == (4, h * w)
    for row in r:
        assert sorted(row.tolist()) == list(range(h * w))
    torch.testing.assert_close(r[1], r[0].flip(0))
    torch.testing.assert_close(r[3], r[2].flip(0))


def test_scan_routes_orders():
    assert scan_routes("raster", 2, 3)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert scan_routes("raster", 2, 3)[2].tolist() == [0, 3, 1, 4, 2, 5]
    assert scan_routes("snake", 2, 3)[0].tolist() == [0, 1, 2, 5, 4, 3]
    assert scan_routes("diagonal", 2, 3)[0].tolist() == [0, 1, 3, 2, 4, 5]


def naive_multihead_scan(m, x):
    """The module written head by head and route by route: project, permute, S6 loop, un-permute, SRA, LN, proj."""
    B, C, H, W = x.shape
    L, Hh, S = H * W, m.config.heads, m.config.head_dim
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
    sub = F.linear(tokens, m.in_proj.weight)  # (B, L, heads*S)
    heads = []
    for hd in range(Hh):
        family = m.config.routes[hd % len(m.config.routes)]
        orders = scan_routes(family, H, W)
        ys = []
        for r in range(4):
            k = 4 * hd + r
            seq = sub[:, orders[r], hd * S:(hd + 1) * S]  # (B, L, S) in route order
            proj = seq @ m.x_proj[k]  # (B, L, r+2n)
            dt, Bm, Cm = proj.split([m.dt_rank, m.config.state, m.config.state], dim=-1)
            delta = F.softplus(dt @ m.dt_proj[k] + m.dt_bias[k])  # (B, L, S)
            y = recurrent_selective_scan(seq[:, None], delta[:, None], -torch.exp(m.A_log[k])[None],
                                         Bm[:, None], Cm[:, None], m.D[k][None])[:, 0]  # (B, L, S)
            back = torch.empty_like(y)
            back[:, orders[r]] = y  # grid order
            ys.append(back)
        ys = torch.stack(ys)  # (4, B, L, S)
        cv = ys.std(0) / ((ys - ys.min(0).values).mean(0) + 1e-5)
        heads.append(ys.sum(0) * torch.relu(cv - m.config.threshold))
    y = torch.cat(heads, dim=-1)  # (B, L, heads*S)
    y = F.linear(F.layer_norm(y, (Hh * S,), m.norm.weight, m.norm.bias), m.out_proj.weight)
    return y.transpose(1, 2).reshape(B, C, H, W)


@pytest.mark.parametrize("heads,H,W,chunk", [(4, 1, 1, 32), (4, 5, 7, 8), (3, 4, 4, 5), (2, 3, 9, 32), (2, 3, 9, 0)],
                         ids=lambda v: str(v))
def test_multihead_scan_matches_head_by_head_loop(heads, H, W, chunk):
    torch.manual_seed(0)
    m = MultiHeadScan(12, heads, state=4, chunk=chunk, threshold=0.1).double()
    x = rand(2, 12, H, W)
    torch.testing.assert_close(m(x), naive_multihead_scan(m, x), rtol=1e-9, atol=1e-9)


def test_multihead_scan_grads_and_errors():
    m = headwise.create("multihead_scan(state=4)", dim=8, heads=4)
    out = m(torch.randn(2, 8, 4, 5))
    assert out.shape == (2, 8, 4, 5)
    assert_all_params_get_grads(m, out)
    with pytest.raises(ValueError, match="routes must be a non-empty tuple"):
        MultiHeadScan(8, routes=("spiral",))
    with pytest.raises(ValueError, match="head_dim defaults to dim // heads, which is 0"):
        MultiHeadScan(2, heads=4)
