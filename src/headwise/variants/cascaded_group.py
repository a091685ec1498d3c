"""EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention (Liu et al., 2023): cascaded
group attention (registered as ``"cascaded_group"``).

Each head attends on its own split of the channels, fed the previous head's output; its queries pass a depthwise
convolution. Each head is one :func:`headwise.attention` call (a head-specific pattern is restricted to the head
by :func:`headwise.ops.head_mixture.restrict`). The module reference is :func:`naive_cascaded`, with the
convolution written out as shifted sums in :func:`naive_depthwise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_positive_int, check_tokens
from headwise.core.attention import attention
from headwise.core.reference import masked_attention
from headwise.ops.head_mixture import restrict
from headwise.patterns import Pattern
from headwise.variants.base import Capabilities, Variant, check_backend, resolve_pattern
from headwise.variants.registry import register

__all__ = ["CascadedGroupAttention", "naive_cascaded", "naive_depthwise"]


@register("cascaded_group")
class CascadedGroupAttention(Variant):
    r"""Cascaded group attention (CGA; Liu et al., 2023, "EfficientViT: Memory Efficient Vision Transformer with
    Cascaded Group Attention").

    Each head sees its own split of the channels, ``x = [x_1, ..., x_H]`` (``C / H`` channels each), and the
    heads run in sequence, each adding the previous head's output to its input:

    .. math::

        \tilde x_1 = x_1,\quad \tilde x_i = x_i + \tilde y_{i-1}\ (i > 1),\qquad
        q_i, k_i, v_i = \tilde x_i [W^Q_i, W^K_i, W^V_i],\quad q_i \leftarrow \mathrm{DWConv}_i(q_i)

        \tilde y_i = \mathrm{softmax}(q_i k_i^\top / \sqrt{d_{qk}})\, v_i,\qquad
        y = \mathrm{ReLU}([\tilde y_1, \dots, \tilde y_H])\, W^P

    ``DWConv_i`` is a depthwise convolution (``kernel_size``, zero padding) over the token sequence, or over a
    2-D grid of ``grid = (rows, cols)`` tokens in row-major order when ``grid`` is given. Values have ``C / H``
    channels so the cascade adds up. The convolution is centred (query ``i`` mixes its neighbours on both
    sides), so the module has no causal mode, whatever the pattern.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; head ``i`` is q, k ``[B, 1, N, d_qk]``, v ``[B, 1, N, C/H]``.

    Args:
        dim: model width ``C``, a multiple of ``heads``.
        heads: number of heads ``H`` (channel splits).
        qk_dim: query/key width ``d_qk``; default 16 (EfficientViT). (Formerly ``key_dim``.)
        kernel_size: odd depthwise kernel size on the queries; default 5 (EfficientViT).
        grid: ``(rows, cols)`` token grid for a 2-D convolution, ``rows * cols`` must equal ``N``; default None (1-D).
        proj_relu: ReLU before the output projection (EfficientViT); default True.
        pattern: a pattern or spec string (head-specific patterns need ``heads`` heads); default None.
        qkv_bias: bias in the qkv projections and the depthwise query convolutions; default True.
        out_bias: bias in the output projection; default True. (``bias=`` sets both, formerly.)
        backend: :func:`headwise.attention` backend; default ``"auto"``.

    Choices made here: EfficientViT works on ``[B, C, H, W]`` windows with BatchNorm after every 1x1 and depthwise
    convolution and adds a learned relative-position bias to the scores; we use linear layers and convolutions
    with bias (what the BatchNorms fold into at inference) and no score bias (:func:`headwise.attention` takes
    patterns, not biases; the windowing of EfficientViT can be expressed as a pattern). With ``heads=1``,
    ``kernel_size=1`` (an identity convolution) and ``proj_relu=False`` it is single-head attention. The
    parameters are ``qkvs`` (per head, ``C/H -> 2 d_qk + C/H``, fused), ``dws`` (per head) and ``proj``.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("cascaded_group(grid=(14, 14))", dim=128, heads=4)
        >>> m(torch.randn(2, 196, 128)).shape
        torch.Size([2, 196, 128])
    """

    capabilities = Capabilities(grid="optional")  # no causal mode: the query convolution sees both sides
    example_config = {"dim": 16, "heads": 2, "qk_dim": 4, "kernel_size": 3}
    aliases = {"key_dim": "qk_dim", "bias": ("qkv_bias", "out_bias")}

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output; a multiple of heads
        heads: int  # number of heads H, each on its own C/H channels
        qk_dim: int = 16  # width of the queries and keys of every head
        kernel_size: int = 5  # odd size of the depthwise convolution on the queries
        grid: tuple[int, int] | None = None  # (rows, cols) token grid for a 2-D convolution; None: 1-D over tokens
        proj_relu: bool = True  # ReLU before the output projection (EfficientViT)
        pattern: Pattern | str | None = None  # allowed (query, key) pairs: a Pattern or spec string; None: all
        qkv_bias: bool = True  # bias in the qkv projections and the depthwise query convolutions
        out_bias: bool = True  # bias in the output projection
        backend: str = "auto"  # headwise.attention backend: "auto", "reference", "sdpa", "blocksparse", "flex"

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            if self.dim % self.heads:
                raise ValueError(f"dim must be divisible by heads, got dim={self.dim} heads={self.heads}")
            check_positive_int("qk_dim", self.qk_dim)
            check_positive_int("kernel_size", self.kernel_size)
            if self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd (same-size convolution), got kernel_size={self.kernel_size}")
            if self.grid is not None:
                if not (isinstance(self.grid, (tuple, list)) and len(self.grid) == 2
                        and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in self.grid)):
                    raise ValueError(f"grid must be None or (rows, cols) of positive ints, got grid={self.grid!r}")
                self.grid = tuple(self.grid)
                if self.kernel_size > min(self.grid):
                    raise ValueError(f"kernel_size={self.kernel_size} exceeds grid={self.grid}")
            for name in ("proj_relu", "qkv_bias", "out_bias"):
                check_bool(name, getattr(self, name))
            self.pattern = resolve_pattern(self.pattern, self.heads)
            check_backend(self.backend)

    def build(self, cfg) -> None:
        split = self.split
        conv = nn.Conv1d if cfg.grid is None else nn.Conv2d
        self.qkvs = nn.ModuleList(nn.Linear(split, 2 * cfg.qk_dim + split, bias=cfg.qkv_bias)
                                  for _ in range(cfg.heads))
        self.dws = nn.ModuleList(conv(cfg.qk_dim, cfg.qk_dim, cfg.kernel_size, padding=cfg.kernel_size // 2,
                                      groups=cfg.qk_dim, bias=cfg.qkv_bias) for _ in range(cfg.heads))
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.out_bias)

    @property
    def split(self) -> int:
        """``C / H``: the input split and the value width of each head."""
        return self.config.dim // self.config.heads

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` -> ``[B, N, C]`` (``N = rows * cols`` when ``grid`` is set)."""
        cfg = self.config
        check_tokens("x", x, cfg.dim)
        N = x.shape[1]
        if cfg.grid is not None and cfg.grid[0] * cfg.grid[1] != N:
            raise ValueError(f"grid={cfg.grid} does not multiply to N={N} tokens")
        splits = x.split(self.split, dim=-1)  # H x (B, N, C/H)
        outs: list[Tensor] = []
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            feat = splits[i] if i == 0 else splits[i] + outs[-1]  # (B, N, C/H): the cascade
            q, k, v = qkv(feat).split([cfg.qk_dim, cfg.qk_dim, self.split], dim=-1)  # (B, N, d_qk|C/H)
            q = self._conv_tokens(dw, q)  # (B, N, d_qk)
            pattern = restrict(cfg.pattern, N, None, torch.tensor([i]), cfg.heads)
            o = attention(q[:, None], k[:, None], v[:, None], pattern, backend=cfg.backend)  # (B, 1, N, C/H)
            outs.append(o[:, 0])
        y = torch.cat(outs, dim=-1)  # (B, N, C)
        return self.proj(F.relu(y) if cfg.proj_relu else y)  # (B, N, C)

    def _conv_tokens(self, dw: nn.Module, t: Tensor) -> Tensor:
        """Depthwise convolution of token features ``[B, N, d]`` along the sequence or the grid."""
        B, N, d = t.shape
        grid = self.config.grid
        if grid is None:
            return dw(t.transpose(1, 2)).transpose(1, 2)  # (B, N, d)
        img = t.transpose(1, 2).reshape(B, d, *grid)  # (B, d, rows, cols), tokens row-major
        return dw(img).reshape(B, d, N).transpose(1, 2)  # (B, N, d)


def naive_depthwise(t: Tensor, weight: Tensor, bias: Tensor | None, grid: tuple[int, int] | None) -> Tensor:
    """Zero-padded depthwise cross-correlation of tokens ``t`` ``[B, N, d]`` by explicit shifted sums (the
    reference of the module's ``nn.Conv1d`` / ``nn.Conv2d``): ``weight`` ``[d, 1, k]`` (or ``[d, 1, k, k]`` on a
    ``grid = (rows, cols)`` of row-major tokens), ``bias`` ``[d]`` or None -> ``[B, N, d]``."""
    B, N, d = t.shape
    k = weight.shape[-1]
    r = k // 2
    bias = 0 if bias is None else bias
    if grid is None:
        pad = F.pad(t, (0, 0, r, r))  # (B, N + 2r, d)
        return sum(pad[:, j : j + N] * weight[:, 0, j] for j in range(k)) + bias
    rows, cols = grid
    img = F.pad(t.view(B, rows, cols, d), (0, 0, r, r, r, r))  # (B, rows + 2r, cols + 2r, d)
    out = sum(img[:, i : i + rows, j : j + cols] * weight[:, 0, i, j] for i in range(k) for j in range(k))
    return (out + bias).reshape(B, N, d)


def naive_cascaded(m: CascadedGroupAttention, x: Tensor) -> Tensor:
    """The reference of :class:`CascadedGroupAttention`, written out with its weights: the cascade head by head,
    the fused projections split by hand, :func:`naive_depthwise` on the queries, materialized attention
    (:func:`headwise.core.reference.masked_attention`) under the head's slice of the pattern's dense mask, ReLU,
    output projection."""
    cfg = m.config
    s, kd, N = m.split, cfg.qk_dim, x.shape[1]
    mask = None if cfg.pattern is None else cfg.pattern.dense_mask(N, N, device=x.device)  # (H or 1, N, N)
    outs = []
    for i in range(cfg.heads):
        feat = x[..., i * s : (i + 1) * s] + (outs[-1] if outs else 0)  # (B, N, C/H)
        qkv = F.linear(feat, m.qkvs[i].weight, m.qkvs[i].bias)
        q, k, v = qkv[..., :kd], qkv[..., kd : 2 * kd], qkv[..., 2 * kd :]
        q = naive_depthwise(q, m.dws[i].weight, m.dws[i].bias, cfg.grid)
        mask_i = None if mask is None else mask[i if mask.shape[0] > 1 else 0]  # (N, N): head i's own pattern
        outs.append(masked_attention(q[:, None], k[:, None], v[:, None], mask_i)[0][:, 0])  # (B, N, C/H)
    y = torch.cat(outs, -1)  # (B, N, C)
    return F.linear(torch.relu(y) if cfg.proj_relu else y, m.proj.weight, m.proj.bias)  # (B, N, C)
