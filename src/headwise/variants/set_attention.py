"""Attention over sets and memory banks: the Distribution Transformer's GMM-component layer with OAT-style
object-level positions (``"set_attention"``) and M3's Gaussian memory attention (``"memory_attention"``).

Both call :func:`headwise.attention` (through :class:`~headwise.variants.mha.MultiHeadAttention` where the
projections are the standard ones) and are permutation-equivariant in their query set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.core.attention import BACKENDS, attention
from headwise.variants.mha import MultiHeadAttention
from headwise.checks import check_positive_int
from headwise.variants.registry import register

__all__ = ["object_positional_encoding", "SetAttention", "MemoryAttention"]


def object_positional_encoding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    r"""Sinusoidal encoding of continuous object coordinates ``positions`` ``[..., P]`` -> ``[..., dim]``.

    Each of the ``P`` coordinates gets ``dim / P`` channels: ``sin(p w_i), cos(p w_i)`` with
    ``w_i = base^{-2i / (dim/P)}`` (the Transformer's encoding, per axis, on real-valued positions), so two
    objects' encodings have a dot product that depends only on their coordinate differences.
    """
    if not isinstance(positions, Tensor) or positions.dim() < 1:
        raise TypeError(f"positions must be a tensor [..., P], got {type(positions).__name__}")
    P = positions.shape[-1]
    if dim % (2 * P):
        raise ValueError(f"dim must be divisible by 2 * P = {2 * P} for P={P} coordinates, got dim={dim}")
    half = dim // (2 * P)
    freqs = base ** (-torch.arange(half, dtype=positions.dtype, device=positions.device) / half)  # (half,)
    angles = positions[..., None] * freqs  # (..., P, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., P * 2 * half) = (..., dim)


@register("set_attention")
class SetAttention(nn.Module):
    r"""The Distribution Transformer layer, from "Distribution Transformers: Fast Approximate Bayesian Inference
    With On-The-Fly Prior Adaptation" (Whittle et al., 2025), with the object-level positional encoding of
    "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction" (Fang et al., ECCV 2024).

    The tokens are a *set*: the components of a Gaussian mixture (prior -> posterior) or the objects of a scene.
    The components attend to each other and then to the data points (pre-norm residual blocks):

    .. math::

        z \leftarrow z + \mathrm{MHA}_{self}(\mathrm{LN}_1(z)),\qquad
        z \leftarrow z + \mathrm{MHA}_{cross}(\mathrm{LN}_2(z), \mathrm{LN}_d(d)),\qquad
        z \leftarrow z + \mathrm{MLP}(\mathrm{LN}_3(z))

    with ``z`` ``[B, K, C]`` the component (or object) tokens and ``d`` ``[B, M, C]`` the embedded data points.
    Without ``data`` the cross-attention block is skipped. There is no sequence position: the layer is
    equivariant to permuting the components and invariant to permuting the data points. Where the set members
    have locations (OAT's objects), ``positions`` ``[B, K, P]`` (and ``data_positions`` ``[B, M, P]``) are
    encoded by :func:`object_positional_encoding` and added to the tokens before the layer -- one encoding
    per object at its real coordinates, not per patch of a grid.

    Shapes: ``z`` ``[B, K, C]``, ``data`` ``[B, M, C]`` -> ``[B, K, C]``.

    Args:
        dim, heads, kv_heads, head_dim, backend: as :class:`MultiHeadAttention` (both attentions).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim`` (default 4).

    Choices made here: the Distribution Transformer embeds each GMM component's parameters (weight, mean,
    covariance factor) into a token and decodes the output tokens back into GMM parameters; those task-specific
    embedding and read-out maps are left to the caller, and this module is the attention layer between them.
    The data tokens get their own LayerNorm. OAT's encoding is sinusoidal over object centres; its paper also
    reshapes the similarity fall-off of the encodings (a fitted power of the cosine similarity), which is not
    reproduced here.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("set_attention", dim=64, heads=4)
        >>> prior = torch.randn(2, 8, 64)                     # 8 mixture components
        >>> m(prior, torch.randn(2, 100, 64)).shape           # attend to 100 data points
        torch.Size([2, 8, 64])
    """

    @dataclass
    class Config:
        dim: int  # token width C of the components/objects and of the data points
        heads: int  # attention heads H of both attentions
        kv_heads: int | None = None  # key/value heads of both attentions; None: heads
        head_dim: int | None = None  # per-head width; None: dim // heads
        mlp_ratio: float = 4.0  # MLP hidden width as a multiple of dim
        backend: str = "auto"  # headwise.attention backend of both attentions

        def __post_init__(self):
            # the attention fields are validated by MultiHeadAttention.Config
            MultiHeadAttention.Config(dim=self.dim, heads=self.heads, kv_heads=self.kv_heads,
                                      head_dim=self.head_dim, backend=self.backend)
            r = self.mlp_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 or int(r * self.dim) < 1:
                raise ValueError(f"mlp_ratio must be a positive number with mlp_ratio * dim >= 1, got mlp_ratio={r!r}")

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, head_dim: int | None = None,
                 mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                        mlp_ratio=mlp_ratio, backend=backend)
        mha = dict(kv_heads=kv_heads, head_dim=head_dim, backend=backend)
        self.norm_self, self.norm_cross, self.norm_data, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = MultiHeadAttention(dim, heads, **mha)
        self.cross_attn = MultiHeadAttention(dim, heads, **mha)
        hidden = int(cfg.mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, z: Tensor, data: Tensor | None = None, *, positions: Tensor | None = None,
                data_positions: Tensor | None = None) -> Tensor:
        dim = self.config.dim
        if positions is not None:
            self._check_positions("positions", positions, z)
            z = z + object_positional_encoding(positions.to(z.dtype), dim)  # (B, K, C)
        z = z + self.self_attn(self.norm_self(z))  # (B, K, C)
        if data is not None:
            if data_positions is not None:
                self._check_positions("data_positions", data_positions, data)
                data = data + object_positional_encoding(data_positions.to(data.dtype), dim)  # (B, M, C)
            z = z + self.cross_attn(self.norm_cross(z), self.norm_data(data))  # (B, K, C)
        elif data_positions is not None:
            raise ValueError("data_positions given without data")
        return z + self.mlp(self.norm_mlp(z))  # (B, K, C)

    @staticmethod
    def _check_positions(name: str, pos, tokens: Tensor) -> None:
        if not isinstance(pos, Tensor) or pos.dim() != 3 or pos.shape[:2] != tokens.shape[:2]:
            got = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
            raise ValueError(f"{name} must be [B, K, P] matching the tokens' [B, K] = {list(tokens.shape[:2])}, "
                             f"got {name}.shape={got}")

    def extra_repr(self) -> str:
        return f"mlp_ratio={self.config.mlp_ratio}"


@register("memory_attention")
class MemoryAttention(nn.Module):
    r"""Gaussian memory attention from "M3: 3D-Spatial MultiModal Memory" (Zou et al., ICLR 2025): low-dimensional
    queries (rendered from the Gaussian primitives) attend over a memory bank of principal scene components,
    and the output is a convex combination of memory entries, so it stays in the foundation model's feature
    space:

    .. math::

        \hat R = \mathrm{Concat}_h\Big(\mathrm{softmax}\big(q W^Q_h\, (M W^K_h)^\top / \sqrt{D}\big)\, M_h\Big)

    with ``q`` ``[B, N, C_q]`` the queries, ``M`` ``[S, C_m]`` the memory bank (``M_h``: the ``h``-th block of
    ``C_m / H`` columns) and ``W^Q``, ``W^K`` learned. The values are the memory itself (no value or output
    projection). The memory is either passed to :meth:`forward` (M3: principal components computed from the
    foundation-model features, fixed) or, with ``entries`` set, a learned parameter.

    Shapes: ``x`` ``[B, N, C_q]``, ``memory`` ``[S, C_m]`` or ``[B, S, C_m]`` -> ``[B, N, C_m]``.

    Args:
        dim: query width ``C_q``.
        memory_dim: width ``C_m`` of the memory entries (and of the output), ``C_m % heads == 0``.
        heads: number of heads ``H`` (default 1, as in M3).
        head_dim: query/key width ``D`` per head (default ``memory_dim // heads``).
        entries: size ``S`` of a learned memory bank; None (default): the memory is an argument of forward.
        backend: :func:`headwise.attention` backend.

    Choices made here: M3 describes a single attention from the rendered query to the memory; ``heads > 1``
    (each head reading its own block of memory columns) is an extension. Keys are a bias-free linear map of
    the memory, queries a linear map with bias.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("memory_attention(memory_dim=512)", dim=16)
        >>> psc = torch.randn(300, 512)                              # principal scene components
        >>> m(torch.randn(2, 1024, 16), psc).shape                   # 1024 rendered pixels
        torch.Size([2, 1024, 512])
    """

    @dataclass
    class Config:
        dim: int  # query width C_q of x [B, N, C_q]
        memory_dim: int  # width C_m of the memory entries and of the output
        heads: int = 1  # attention heads H, memory_dim % heads == 0
        head_dim: int | None = None  # query/key width D per head; None: memory_dim // heads
        entries: int | None = None  # size S of a learned memory bank; None: memory passed to forward
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            for name in ("dim", "memory_dim", "heads"):
                check_positive_int(name, getattr(self, name))
            if self.memory_dim % self.heads:
                raise ValueError(f"memory_dim must be divisible by heads, got memory_dim={self.memory_dim} "
                                 f"heads={self.heads}")
            if self.head_dim is None:
                self.head_dim = self.memory_dim // self.heads
            check_positive_int("head_dim", self.head_dim)
            if self.entries is not None:
                check_positive_int("entries", self.entries)
            if self.backend != "auto" and self.backend not in BACKENDS:
                raise ValueError(f"unknown backend={self.backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))

    def __init__(self, dim: int, memory_dim: int, *, heads: int = 1, head_dim: int | None = None,
                 entries: int | None = None, backend: str = "auto"):
        super().__init__()
        self.config = cfg = self.Config(dim=dim, memory_dim=memory_dim, heads=heads, head_dim=head_dim,
                                        entries=entries, backend=backend)
        self.q_proj = nn.Linear(dim, cfg.heads * cfg.head_dim)
        self.k_proj = nn.Linear(memory_dim, cfg.heads * cfg.head_dim, bias=False)
        self.memory = nn.Parameter(torch.randn(cfg.entries, memory_dim)) if cfg.entries is not None else None

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        cfg = self.config
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != cfg.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, N, C_q] with C_q = dim = {cfg.dim}, got {got}")
        if memory is None:
            if self.memory is None:
                raise ValueError("memory_attention without entries= needs a memory [S, C_m] argument")
            memory = self.memory
        if not isinstance(memory, Tensor) or memory.dim() not in (2, 3) or memory.shape[-1] != cfg.memory_dim:
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory must be [S, C_m] or [B, S, C_m] with C_m = memory_dim = {cfg.memory_dim}, "
                             f"got {got}")
        B, N, _ = x.shape
        H, D = cfg.heads, cfg.head_dim
        if memory.dim() == 3 and memory.shape[0] != B:
            raise ValueError(f"memory [B, S, C_m] must have x's batch size B={B}, got memory.shape={tuple(memory.shape)}")
        if memory.dim() == 2:
            memory = memory.expand(B, -1, -1)  # (B, S, C_m)
        S = memory.shape[1]
        q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(memory).view(B, S, H, D).transpose(1, 2)  # (B, H, S, D)
        v = memory.view(B, S, H, cfg.memory_dim // H).transpose(1, 2)  # (B, H, S, C_m/H)
        out = attention(q, k, v, backend=cfg.backend)  # (B, H, N, C_m/H)
        return out.transpose(1, 2).reshape(B, N, cfg.memory_dim)  # (B, N, C_m)

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, memory_dim={c.memory_dim}, heads={c.heads}, head_dim={c.head_dim}, entries={c.entries}"
