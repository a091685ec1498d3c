"""Convolutional, spectral and scan token mixers from vision papers: Large Kernel Attention (``"lka"``), ULSAM
(``"ulsam"``), SpectFormer's spectral gating (``"spectral"``), NiNformer's mixer-gated unit (``"nin_gate"``) and
MHS-VM's multi-head scan (``"multihead_scan"``).

None of these computes softmax dot-product attention: each builds an *attention map* (a multiplicative gate) by
convolution, FFT, an MLP-Mixer or a selective scan. Input layouts differ by paper and are stated per class:
CNN modules take feature maps ``[B, C, H, W]``; token modules take ``[B, N, C]``. The selective scan has a
step-by-step form (:func:`recurrent_selective_scan`, the module's default and the reference) and a chunked
form (:func:`chunk_selective_scan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_positive_int
from headwise.variants.registry import register

__all__ = [
    "LargeKernelAttention",
    "SubspaceAttention",
    "SpectralGating",
    "MixerGatingUnit",
    "MultiHeadScan",
    "scan_routes",
    "recurrent_selective_scan",
    "chunk_selective_scan",
    "ROUTES",
]


def _check_feature_map(name: str, x, channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be [B, C, H, W] with C = dim = {channels}, got {name}.shape={tuple(x.shape)}")


def _check_tokens(name: str, x, dim: int, tokens: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, N, C], got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must be [B, N, C] with C = dim = {dim}, got {name}.shape={tuple(x.shape)}")
    if tokens is not None and x.shape[1] != tokens:
        raise ValueError(f"{name} must have N = tokens = {tokens} tokens, got {name}.shape={tuple(x.shape)}")


def _check_unit_float(name: str, value, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 < value < 1 if low_open else 0 <= value < 1):
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ValueError(f"{name} must be a number in {interval}, got {name}={value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Large Kernel Attention (VAN)
# ---------------------------------------------------------------------------------------------------------------


@register("lka")
class LargeKernelAttention(nn.Module):
    r"""Large Kernel Attention from "Visual Attention Network" (Guo et al., 2022), on CNN feature maps.

    A ``K x K`` convolution is decomposed into a ``(2d-1) x (2d-1)`` depthwise convolution, a
    ``ceil(K/d) x ceil(K/d)`` depthwise convolution with dilation ``d`` and a ``1 x 1`` convolution; the result
    is an attention map that multiplies the input:

    .. math::

        \mathrm{Attention} = \mathrm{Conv}_{1\times1}(\mathrm{DW\text{-}D\text{-}Conv}(\mathrm{DW\text{-}Conv}(F))),
        \qquad \mathrm{Output} = \mathrm{Attention} \otimes F

    Shapes: ``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]`` (``C = dim``); padding keeps ``H, W``.

    Args:
        dim: channels ``C``.
        kernel_size: the large kernel ``K`` being decomposed (odd, default 21 as in VAN).
        dilation: dilation ``d`` (default 3): the paper's ``K=21, d=3`` gives a 5x5 depthwise and a 7x7
            depthwise convolution with dilation 3.

    Choices made here: ``ceil(K/d)`` is rounded up to the next odd size so that padding keeps the spatial size
    (it is already odd for the paper's K=21, d=3). This is the LKA unit only; VAN's "attention" sub-block wraps
    it as ``x + proj_2(LKA(GELU(proj_1(x))))`` with 1x1 ``proj_1``/``proj_2``, left to the caller.

    Example:
        >>> import torch, headwise
        >>> headwise.create("lka", dim=32)(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    @dataclass
    class Config:
        dim: int  # channels C of the feature map [B, C, H, W]
        kernel_size: int = 21  # the large kernel K that the three convolutions decompose (odd)
        dilation: int = 3  # dilation d of the depthwise dilated convolution

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("kernel_size", self.kernel_size)
            check_positive_int("dilation", self.dilation)
            if self.kernel_size % 2 == 0 or self.kernel_size < 3:
                raise ValueError(f"kernel_size must be an odd int >= 3, got kernel_size={self.kernel_size}")
            if self.dilation > self.kernel_size:
                raise ValueError(f"dilation must not exceed kernel_size, got dilation={self.dilation} "
                                 f"kernel_size={self.kernel_size}")

    def __init__(self, dim: int, *, kernel_size: int = 21, dilation: int = 3):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, kernel_size=kernel_size, dilation=dilation)
        d = cfg.dilation
        local = 2 * d - 1  # (2d-1) x (2d-1) depthwise kernel
        far = math.ceil(cfg.kernel_size / d)
        far += 1 - far % 2  # odd, so "same" padding exists
        self.local_size, self.dilated_size = local, far
        self.conv0 = nn.Conv2d(dim, dim, local, padding=local // 2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, far, padding=d * (far // 2), dilation=d, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check_feature_map("x", x, self.config.dim)
        attn = self.conv1(self.conv_spatial(self.conv0(x)))  # (B, C, H, W)
        return attn * x  # (B, C, H, W)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, kernel_size={c.kernel_size}, dilation={c.dilation}"


# ---------------------------------------------------------------------------------------------------------------
# ULSAM
# ---------------------------------------------------------------------------------------------------------------


@register("ulsam")
class SubspaceAttention(nn.Module):
    r"""Ultra-Lightweight Subspace Attention Module from "ULSAM: Ultra-Lightweight Subspace Attention Module for
    Compact Convolutional Neural Networks" (Saini et al., WACV 2020), on CNN feature maps.

    The ``C`` channels are split into ``g`` subspaces ``F_1..F_g`` of ``C/g`` channels; each gets one spatial
    attention map:

    .. math::

        A_n = \mathrm{softmax}\big(\mathrm{PW}^1(\mathrm{maxpool}^{3\times3,1}(\mathrm{DW}^{1\times1}(F_n)))\big),
        \qquad \hat F_n = (A_n \otimes F_n) \oplus F_n,
        \qquad \hat F = \mathrm{concat}(\hat F_1, \dots, \hat F_g)

    ``DW^{1x1}`` is a depthwise 1x1 convolution (a per-channel affine map), ``maxpool`` has kernel 3, stride 1,
    padding 1, ``PW^1`` is a pointwise convolution from the ``C/g`` channels of the subspace to one map, and the
    softmax runs over the ``H W`` positions. ``A_n`` ``[B, 1, H, W]`` multiplies every channel of ``F_n``.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]`` (``C = dim``, ``dim % groups == 0``).

    Args:
        dim: channels ``C``.
        groups: number of subspaces ``g`` (default 4; the paper sweeps 1 to 16).

    Choices made here: the equations above, without the batch norm and ReLU that the authors' released code puts
    after each convolution. The module runs all subspaces at once (grouped convolutions);
    :meth:`naive_forward` loops over subspaces and is the test reference.

    Example:
        >>> import torch, headwise
        >>> headwise.create("ulsam", dim=32, groups=4)(torch.randn(2, 32, 14, 14)).shape
        torch.Size([2, 32, 14, 14])
    """

    @dataclass
    class Config:
        dim: int  # channels C of the feature map [B, C, H, W]
        groups: int = 4  # number of channel subspaces g, dim % groups == 0

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("groups", self.groups)
            if self.dim % self.groups:
                raise ValueError(f"dim must be divisible by groups, got dim={self.dim} groups={self.groups}")

    def __init__(self, dim: int, *, groups: int = 4):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, groups=groups)
        self.dw = nn.Conv2d(dim, dim, 1, groups=dim)  # DW^{1x1} of every subspace at once
        self.pw = nn.Conv2d(dim, cfg.groups, 1, groups=cfg.groups)  # PW^1: C/g channels -> 1 map, per subspace

    def forward(self, x: Tensor) -> Tensor:
        _check_feature_map("x", x, self.config.dim)
        B, C, H, W = x.shape
        g = self.config.groups
        s = self.pw(F.max_pool2d(self.dw(x), 3, stride=1, padding=1))  # (B, g, H, W)
        a = torch.softmax(s.flatten(2), dim=-1).view(B, g, 1, H, W)  # (B, g, 1, H, W)
        xg = x.view(B, g, C // g, H, W)  # (B, g, C/g, H, W)
        return (a * xg + xg).view(B, C, H, W)  # (B, C, H, W)

    def naive_forward(self, x: Tensor) -> Tensor:
        """The paper's per-subspace loop (reference for tests): one DW, maxpool, PW and softmax per subspace."""
        B, C, H, W = x.shape
        g = self.config.groups
        c = C // g
        outs = []
        for n in range(g):
            f = x[:, n * c:(n + 1) * c]  # (B, C/g, H, W)
            dw = F.conv2d(f, self.dw.weight[n * c:(n + 1) * c], self.dw.bias[n * c:(n + 1) * c], groups=c)
            s = F.conv2d(F.max_pool2d(dw, 3, stride=1, padding=1), self.pw.weight[n:n + 1], self.pw.bias[n:n + 1])
            a = torch.softmax(s.reshape(B, H * W), dim=-1).reshape(B, 1, H, W)  # (B, 1, H, W)
            outs.append(a * f + f)
        return torch.cat(outs, dim=1)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"dim={self.config.dim}, groups={self.config.groups}"


# ---------------------------------------------------------------------------------------------------------------
# SpectFormer spectral gating
# ---------------------------------------------------------------------------------------------------------------


def _grid_tuple(grid) -> tuple[int, int]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be (h, w) positive ints or one int for a square grid, got grid={grid!r}")
    return int(grid[0]), int(grid[1])


@register("spectral")
class SpectralGating(nn.Module):
    r"""SpectFormer's spectral gating token mixer, from "SpectFormer: Frequency and Attention is what you need in a
    Vision Transformer" (Patro, Namboodiri and Agneeswaran, 2023), the GFNet global filter (Rao et al., 2021).

    Tokens ``[B, N, C]`` on an ``h x w`` patch grid (``N = h w``) are mixed by a learnable global filter in the
    frequency domain:

    .. math::

        X = \mathcal{F}_{2D}[x], \qquad \tilde X = K \odot X, \qquad y = \mathcal{F}^{-1}_{2D}[\tilde X]

    with the real 2-D FFT over the grid (``norm="ortho"``) and ``K`` a complex filter ``[h, w//2+1, C]``, one
    per channel. Multiplying by ``K`` is a circular convolution over the grid with the kernel
    ``irfft2(K)`` (unnormalized), so ``K = 1`` is the identity. SpectFormer stacks these blocks (as
    ``x + spectral(LN(x))`` followed by an MLP) in the early layers and attention blocks in the later ones.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``, token ``n`` at grid row ``n // w``, column ``n % w``.

    Args:
        dim: channels ``C``.
        grid: the patch grid ``(h, w)`` (an int for a square grid); the filter's size depends on it.

    Choices made here: the filter is initialised as ``1 + 0.02 * N(0, 1)`` (real and imaginary parts),
    i.e. near the identity, whereas GFNet draws ``0.02 * N(0, 1)``; the FFT runs in float32 at least (half
    precision inputs are cast up and back). There is no class token: remove it before this layer.

    Example:
        >>> import torch, headwise
        >>> headwise.create("spectral(grid=(14, 14))", dim=64)(torch.randn(2, 196, 64)).shape
        torch.Size([2, 196, 64])
    """

    @dataclass
    class Config:
        dim: int  # channels C of the tokens [B, N, C]
        grid: tuple[int, int] | int  # patch grid (h, w) with N = h * w (an int means a square grid)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            self.grid = _grid_tuple(self.grid)

    def __init__(self, dim: int, grid: tuple[int, int] | int):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, grid=grid)
        h, w = cfg.grid
        weight = torch.zeros(h, w // 2 + 1, dim, 2)
        weight[..., 0] = 1.0
        self.filter = nn.Parameter(weight + 0.02 * torch.randn_like(weight))  # (h, w//2+1, C, 2) real, imag

    def forward(self, x: Tensor) -> Tensor:
        h, w = self.config.grid
        _check_tokens("x", x, self.config.dim, h * w)
        B, N, C = x.shape
        dtype = x.dtype
        xf = x.view(B, h, w, C).to(torch.promote_types(dtype, torch.float32))  # (B, h, w, C)
        X = torch.fft.rfft2(xf, dim=(1, 2), norm="ortho")  # (B, h, w//2+1, C) complex
        X = X * torch.view_as_complex(self.filter.to(xf.dtype).contiguous())  # (B, h, w//2+1, C)
        y = torch.fft.irfft2(X, s=(h, w), dim=(1, 2), norm="ortho")  # (B, h, w, C)
        return y.reshape(B, N, C).to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.config.dim}, grid={self.config.grid}"


# ---------------------------------------------------------------------------------------------------------------
# NiNformer mixer gating unit
# ---------------------------------------------------------------------------------------------------------------


class _FeedForward(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (the MLP of ViT and MLP-Mixer)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


@register("nin_gate")
class MixerGatingUnit(nn.Module):
    r"""NiNformer's network-in-network token mixer, from "NiNformer: A Network in Network Transformer with Token
    Mixing Generated Gating Function" (Abdullah and Aydin, 2024): the attention sub-layer of a ViT block is
    replaced by a linear map gated element-wise by an inner MLP-Mixer block.

    .. math::

        u = x W + b, \qquad
        z = x + \mathrm{MLP}_{tok}(\mathrm{LN}_1(x)^\top)^\top, \qquad
        g = z + \mathrm{MLP}_{ch}(\mathrm{LN}_2(z)), \qquad
        y = u \odot g

    ``MLP_tok`` mixes the ``N`` tokens (``N -> token_hidden -> N``, shared across channels) and ``MLP_ch`` the
    channels (``C -> channel_hidden -> C``); both are Linear-GELU-Linear. The gate ``g`` depends on the whole
    input, which is the "dynamic" gating that distinguishes NiNformer from a static MLP-Mixer. The NiNformer
    block is ``x + nin_gate(LN(x))`` followed by ``x + MLP(LN(x))``.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]`` with ``N = tokens`` fixed at construction (the token MLP's width).

    Args:
        dim: channels ``C``.
        tokens: number of tokens ``N``.
        token_hidden: hidden width of the token-mixing MLP (default ``4 * dim``).
        channel_hidden: hidden width of the channel-mixing MLP (default ``4 * dim``).
        dropout: dropout inside both MLPs, in ``[0, 1)`` (default 0).

    Choices made here: the default hidden widths follow the authors' code, which passes one ``d_ffn`` to both
    MLPs; we take ``4 * dim`` for it. The gate has no sigmoid (the paper's element-wise product of the two
    branches).

    Example:
        >>> import torch, headwise
        >>> headwise.create("nin_gate(tokens=64)", dim=32)(torch.randn(2, 64, 32)).shape
        torch.Size([2, 64, 32])
    """

    @dataclass
    class Config:
        dim: int  # channels C of the tokens [B, N, C]
        tokens: int  # number of tokens N (the token-mixing MLP acts on this axis)
        token_hidden: int | None = None  # hidden width of the token-mixing MLP; None: 4 * dim
        channel_hidden: int | None = None  # hidden width of the channel-mixing MLP; None: 4 * dim
        dropout: float = 0.0  # dropout inside both MLPs, in [0, 1)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("tokens", self.tokens)
            if self.token_hidden is None:
                self.token_hidden = 4 * self.dim
            if self.channel_hidden is None:
                self.channel_hidden = 4 * self.dim
            check_positive_int("token_hidden", self.token_hidden)
            check_positive_int("channel_hidden", self.channel_hidden)
            _check_unit_float("dropout", self.dropout)

    def __init__(self, dim: int, tokens: int, *, token_hidden: int | None = None, channel_hidden: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, tokens=tokens, token_hidden=token_hidden,
                                        channel_hidden=channel_hidden, dropout=dropout)
        self.proj = nn.Linear(dim, dim)
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = _FeedForward(tokens, cfg.token_hidden, cfg.dropout)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = _FeedForward(dim, cfg.channel_hidden, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens("x", x, self.config.dim, self.config.tokens)
        u = self.proj(x)  # (B, N, C)
        z = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        g = z + self.channel_mlp(self.channel_norm(z))  # (B, N, C)
        return u * g  # (B, N, C)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, tokens={c.tokens}, token_hidden={c.token_hidden}, channel_hidden={c.channel_hidden}"


# ---------------------------------------------------------------------------------------------------------------
# MHS-VM multi-head scan
# ---------------------------------------------------------------------------------------------------------------


def _route(name: str, h: int, w: int) -> list[int]:
    """One scan order over an ``h x w`` grid as flat indices ``i * w + j``."""
    cells = [(i, j) for i in range(h) for j in range(w)]
    if name == "row":
        order = cells
    elif name == "column":
        order = sorted(cells, key=lambda c: (c[1], c[0]))
    elif name == "row_snake":
        order = sorted(cells, key=lambda c: (c[0], c[1] if c[0] % 2 == 0 else -c[1]))
    elif name == "column_snake":
        order = sorted(cells, key=lambda c: (c[1], c[0] if c[1] % 2 == 0 else -c[0]))
    elif name == "diagonal":  # along anti-diagonals i + j = const, each top to bottom
        order = sorted(cells, key=lambda c: (c[0] + c[1], c[0]))
    elif name == "antidiagonal":  # along diagonals j - i = const, each top to bottom
        order = sorted(cells, key=lambda c: (c[1] - c[0], c[0]))
    elif name == "zigzag":  # JPEG zig-zag: anti-diagonals in alternating directions
        order = sorted(cells, key=lambda c: (c[0] + c[1], c[0] if (c[0] + c[1]) % 2 else -c[0]))
    elif name == "zigzag_transposed":
        order = sorted(cells, key=lambda c: (c[0] + c[1], -c[0] if (c[0] + c[1]) % 2 else c[0]))
    else:
        raise ValueError(f"unknown scan route {name=}")
    return [i * w + j for i, j in order]


# each head scans two routes, each forward and reversed (four sequences), like the authors' C/X/S/Z patterns
ROUTES: dict[str, tuple[str, str]] = {
    "raster": ("row", "column"),
    "snake": ("row_snake", "column_snake"),
    "diagonal": ("diagonal", "antidiagonal"),
    "zigzag": ("zigzag", "zigzag_transposed"),
}


def scan_routes(family: str, h: int, w: int) -> Tensor:
    """The four scan orders of a route family on an ``h x w`` grid: ``[4, h w]`` long tensor of flat positions
    (route 1, route 1 reversed, route 2, route 2 reversed); each row is a permutation of ``range(h w)``."""
    if family not in ROUTES:
        raise ValueError(f"unknown route family={family!r}; valid: {', '.join(map(repr, ROUTES))}")
    a, b = (torch.tensor(_route(r, h, w)) for r in ROUTES[family])
    return torch.stack([a, a.flip(0), b, b.flip(0)])  # (4, h*w)


def recurrent_selective_scan(x: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor) -> Tensor:
    r"""Mamba's selective scan (S6), one step at a time (the reference).

    ``h_t = exp(delta_t A) * h_{t-1} + (delta_t x_t) B_t``, ``y_t = h_t C_t + D x_t`` per channel, with
    ``x, delta`` ``[B, K, L, d]``, ``A`` ``[K, d, n]`` (negative), ``Bm, Cm`` ``[B, K, L, n]``, ``D`` ``[K, d]``
    for ``K`` independent sequences; returns ``y`` ``[B, K, L, d]``.
    """
    Bsz, K, L, d = x.shape
    h = x.new_zeros(Bsz, K, d, A.shape[-1])  # (B, K, d, n)
    ys = []
    for t in range(L):
        decay = torch.exp(delta[:, :, t, :, None] * A)  # (B, K, d, n)
        h = decay * h + (delta[:, :, t] * x[:, :, t])[..., None] * Bm[:, :, t, None, :]  # (B, K, d, n)
        ys.append((h * Cm[:, :, t, None, :]).sum(-1))  # (B, K, d)
    return torch.stack(ys, dim=2) + D[:, None] * x  # (B, K, L, d)


def chunk_selective_scan(x: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor,
                         chunk: int = 32) -> Tensor:
    r"""The selective scan of :func:`recurrent_selective_scan`, ``chunk`` steps at a time.

    Within a chunk, with ``P_t = \sum_{r \le t} delta_r A`` (cumulative log-decay from the chunk start) and
    ``u_s = (delta_s x_s) B_s``: ``h_t = exp(P_t) h_0 + \sum_{s \le t} exp(P_t - P_s) u_s`` -- all pairs
    ``(t, s)`` of the chunk at once (the exponent is masked to ``-inf`` above the diagonal before ``exp``, so
    nothing overflows); the last state carries to the next chunk. Same shapes and result as the reference.
    """
    check_positive_int("chunk", chunk)
    Bsz, K, L, d = x.shape
    h = x.new_zeros(Bsz, K, d, A.shape[-1])  # (B, K, d, n)
    ys = []
    for t0 in range(0, L, chunk):
        sl = slice(t0, min(t0 + chunk, L))
        T = sl.stop - sl.start
        P = torch.cumsum(delta[:, :, sl, :, None] * A[:, None], dim=2)  # (B, K, T, d, n)
        u = (delta[:, :, sl] * x[:, :, sl])[..., None] * Bm[:, :, sl, None, :]  # (B, K, T, d, n)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T) s <= t
        diff = P[:, :, :, None] - P[:, :, None, :]  # (B, K, T, T, d, n)
        diff = diff.masked_fill(~causal[:, :, None, None], -math.inf)
        hs = torch.einsum("bktsdn,bksdn->bktdn", torch.exp(diff), u) + torch.exp(P) * h[:, :, None]  # (B, K, T, d, n)
        ys.append(torch.einsum("bktdn,bktn->bktd", hs, Cm[:, :, sl]))  # (B, K, T, d)
        h = hs[:, :, -1]  # (B, K, d, n)
    return torch.cat(ys, dim=2) + D[:, None] * x  # (B, K, L, d)


@register("multihead_scan")
class MultiHeadScan(nn.Module):
    r"""Multi-Head Scan from "MHS-VM: Multi-Head Scanning in Parallel Subspaces for Vision Mamba" (Ji, 2024), on
    CNN-layout feature maps.

    The input is projected into ``heads`` low-dimensional subspaces; in each subspace a selective scan (Mamba's
    S6) runs along that head's scan routes, the route outputs are fused by scan-route attention, and the heads
    are concatenated, normalized and projected back:

    .. math::

        x^1, \dots, x^H = [W_1; \dots; W_H]\, x, \qquad
        y^h_k = \mathrm{S6}^h_k(\pi_k(x^h)), \quad k = 1..4 \text{ (two routes, each forward and reversed)}

        \mathrm{SRA}(y^h) = \Big(\sum_k \pi_k^{-1}(y^h_k)\Big) \odot \mathrm{ReLU}(\mathrm{CV}_k - t),\quad
        \mathrm{CV} = \frac{\mathrm{std}_k(y)}{\mathrm{mean}_k(y - \min_k y) + 10^{-5}}

        y = W_o\, \mathrm{LN}(\mathrm{concat}_h \mathrm{SRA}(y^h))

    ``S6``: ``delta = softplus(W_dt (W_r x) + b_dt)``, ``B = W_B x``, ``C = W_C x``, ``h_t = exp(delta_t A) h_{t-1}
    + delta_t B_t x_t``, ``y_t = C_t h_t + D x_t`` with ``A = -exp(A_log)`` (S4D-real initialisation,
    ``A_log = log(1..n)``), ``D = 1`` and ``delta`` initialised log-uniform in ``[1e-3, 1e-1]`` as in Mamba.
    Every (head, route) pair has its own S6 parameters.

    Route families (one per head, cycling through ``routes``): ``"raster"`` (row-major, column-major),
    ``"snake"`` (row and column boustrophedon), ``"diagonal"`` (anti-diagonals and diagonals), ``"zigzag"``
    (JPEG zig-zag and its transpose); see :func:`scan_routes`.

    Shapes: ``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]``; a head works on ``[B, S, H W]`` sequences, ``S = head_dim``.

    Args:
        dim: channels ``C``.
        heads: number of scan heads (subspaces), default 4.
        head_dim: subspace width ``S``; default ``dim // heads`` (the paper notes ``C = H S`` need not hold).
        state: SSM state size ``n`` (default 16).
        routes: route families assigned to heads in turn (default all four, in the order above).
        threshold: the scan-route-attention threshold ``t`` (default 0).
        chunk: 0 (default) runs :func:`recurrent_selective_scan`; ``chunk > 0`` runs :func:`chunk_selective_scan`
            with that many steps per chunk (same result). The chunked form materializes ``[B, K, T, T, S, n]``
            per chunk: at B = 128, 16 sequences of 49 steps it took 7 s (chunk 16) against 0.5 s step by step
            (forward + backward, this CPU), so step by step is the default.

    Choices made here: the paper leaves its exact route tables to a generated dictionary; we use the four
    families above. The selective scan is plain PyTorch (exact), not Mamba's fused CUDA kernel. The
    input projection and the output projection have no bias, as in the authors' code.

    Example:
        >>> import torch, headwise
        >>> headwise.create("multihead_scan", dim=32, heads=4)(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    @dataclass
    class Config:
        dim: int  # channels C of the feature map [B, C, H, W]
        heads: int = 4  # number of scan heads (subspaces)
        head_dim: int | None = None  # subspace width S; None: dim // heads
        state: int = 16  # SSM state size n
        routes: tuple[str, ...] = ("raster", "snake", "diagonal", "zigzag")  # route family per head, cycled
        threshold: float = 0.0  # scan-route-attention threshold t
        chunk: int = 0  # 0: the step-by-step scan; > 0: time steps per chunk of the chunked selective scan

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.head_dim is None:
                if self.dim < self.heads:
                    raise ValueError(f"head_dim defaults to dim // heads, which is 0 for dim={self.dim} "
                                     f"heads={self.heads}; pass head_dim=")
                self.head_dim = self.dim // self.heads
            check_positive_int("head_dim", self.head_dim)
            check_positive_int("state", self.state)
            if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
                raise ValueError(f"chunk must be an int >= 0 (0: the step-by-step scan), got chunk={self.chunk!r}")
            if isinstance(self.routes, str):
                self.routes = (self.routes,)
            self.routes = tuple(self.routes)
            bad = [r for r in self.routes if r not in ROUTES]
            if not self.routes or bad:
                raise ValueError(f"routes must be a non-empty tuple of {tuple(ROUTES)}, got routes={self.routes!r}")
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
                raise TypeError(f"threshold must be a number, got threshold={self.threshold!r}")

    def __init__(self, dim: int, heads: int = 4, *, head_dim: int | None = None, state: int = 16,
                 routes: tuple[str, ...] = ("raster", "snake", "diagonal", "zigzag"), threshold: float = 0.0,
                 chunk: int = 0):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, head_dim=head_dim, state=state, routes=routes,
                                        threshold=threshold, chunk=chunk)
        Hh, S, n = cfg.heads, cfg.head_dim, cfg.state
        K = 4 * Hh  # sequences: 4 per head
        r = math.ceil(S / 16)  # dt rank, Mamba's "auto"
        self.dt_rank = r
        self.in_proj = nn.Linear(dim, Hh * S, bias=False)
        self.x_proj = nn.Parameter(torch.empty(K, S, r + 2 * n).uniform_(-S ** -0.5, S ** -0.5))  # (K, S, r+2n)
        self.dt_proj = nn.Parameter(torch.empty(K, r, S).uniform_(-r ** -0.5, r ** -0.5))  # (K, r, S)
        dt = torch.exp(torch.rand(K, S) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # (K, S) inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(K, S, 1))  # (K, S, n)
        self.D = nn.Parameter(torch.ones(K, S))  # (K, S)
        self.norm = nn.LayerNorm(Hh * S)
        self.out_proj = nn.Linear(Hh * S, dim, bias=False)
        self._orders: dict[tuple[int, int, str], Tensor] = {}

    def head_routes(self, h: int, w: int, device) -> Tensor:
        """Scan orders of every head on an ``h x w`` grid: ``[heads, 4, h w]`` (cached per grid)."""
        key = (h, w, str(device))
        if key not in self._orders:
            fams = [self.config.routes[i % len(self.config.routes)] for i in range(self.config.heads)]
            self._orders[key] = torch.stack([scan_routes(f, h, w) for f in fams]).to(device)  # (heads, 4, L)
        return self._orders[key]

    def scan_parameters(self, xs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """S6's input-dependent ``delta, B, C`` for sequences ``xs`` ``[B, K, L, S]`` and ``A`` ``[K, S, n]``."""
        n, r = self.config.state, self.dt_rank
        proj = torch.einsum("bkls,ksc->bklc", xs, self.x_proj)  # (B, K, L, r+2n)
        dt, Bm, Cm = proj.split([r, n, n], dim=-1)  # (B, K, L, r), 2 x (B, K, L, n)
        delta = F.softplus(torch.einsum("bklr,krs->bkls", dt, self.dt_proj) + self.dt_bias[:, None])  # (B, K, L, S)
        return delta, -torch.exp(self.A_log), Bm, Cm, self.D

    def forward(self, x: Tensor, *, scan=None) -> Tensor:
        """``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]``; ``scan`` replaces :func:`chunk_selective_scan` (tests pass
        :func:`recurrent_selective_scan`)."""
        _check_feature_map("x", x, self.config.dim)
        Bsz, C, H, W = x.shape
        Hh, S, L = self.config.heads, self.config.head_dim, H * W
        sub = self.in_proj(x.flatten(2).transpose(1, 2)).view(Bsz, L, Hh, S)  # (B, L, heads, S)
        orders = self.head_routes(H, W, x.device)  # (heads, 4, L)
        idx = orders.permute(1, 2, 0)[None, ..., None].expand(Bsz, 4, L, Hh, S)  # (B, 4, L, heads, S)
        xs = torch.gather(sub[:, None].expand(Bsz, 4, L, Hh, S), 2, idx)  # (B, 4, L, heads, S) in route order
        xs = xs.permute(0, 3, 1, 2, 4).reshape(Bsz, Hh * 4, L, S)  # (B, K, L, S)
        delta, A, Bm, Cm, D = self.scan_parameters(xs)
        if scan is None and self.config.chunk == 0:
            ys = recurrent_selective_scan(xs, delta, A, Bm, Cm, D)  # (B, K, L, S)
        elif scan is None:
            ys = chunk_selective_scan(xs, delta, A, Bm, Cm, D, self.config.chunk)  # (B, K, L, S)
        else:
            ys = scan(xs, delta, A, Bm, Cm, D)
        ys = ys.view(Bsz, Hh, 4, L, S).permute(0, 2, 3, 1, 4)  # (B, 4, L, heads, S) in route order
        ys = torch.zeros_like(ys).scatter(2, idx, ys)  # (B, 4, L, heads, S) back to grid order
        y = self.route_attention(ys, dim=1)  # (B, L, heads, S)
        y = self.out_proj(self.norm(y.reshape(Bsz, L, Hh * S)))  # (B, L, C)
        return y.transpose(1, 2).reshape(Bsz, C, H, W)

    def route_attention(self, ys: Tensor, dim: int) -> Tensor:
        """Scan-route attention (the authors' gated fusion unit): the sum of the route outputs along ``dim``,
        gated by ``ReLU(CV - t)`` with ``CV`` the coefficient of variation of the routes at each element."""
        total = ys.sum(dim)
        shifted = ys - ys.amin(dim, keepdim=True)
        cv = ys.std(dim) / (shifted.mean(dim) + 1e-5)
        return total * F.relu(cv - self.config.threshold)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, heads={c.heads}, head_dim={c.head_dim}, state={c.state}, routes={c.routes}"
