"""Gaussian memory attention from "M3: 3D-Spatial MultiModal Memory" (Zou et al., ICLR 2025) (registered as
``"memory_attention"``).

Low-dimensional queries attend over a memory bank of principal scene components; the values are the memory
entries themselves, so the output is a convex combination of them (it stays in the foundation model's feature
space). The attention step is :func:`headwise.attention`; the memory is a second input of the forward (or a
learned bank), not a context of width ``dim``. The reference is :func:`naive_memory_attention`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_positive_int, check_tokens
from headwise.core.attention import attention
from headwise.variants.base import Capabilities, Variant, check_backend
from headwise.variants.registry import register

__all__ = ["MemoryAttention", "naive_memory_attention"]


@register("memory_attention")
class MemoryAttention(Variant):
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
        entries: size ``S`` of a learned memory bank; None (default): the memory is an argument of forward
            (then a required input: ``capabilities_for`` declares ``inputs=("memory",)``).
        backend: :func:`headwise.attention` backend.

    Choices made here: M3 describes a single attention from the rendered query to the memory; ``heads > 1``
    (each head reading its own block of memory columns) is an extension. Keys are a bias-free linear map of
    the memory, queries a linear map with bias. The output has the memory's width ``C_m``: like ``x`` only when
    ``memory_dim == dim``. Queries attend to the memory, not to each other: no causal mode is needed or offered.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("memory_attention(memory_dim=512)", dim=16)
        >>> psc = torch.randn(300, 512)                              # principal scene components
        >>> m(torch.randn(2, 1024, 16), psc).shape                   # 1024 rendered pixels
        torch.Size([2, 1024, 512])
    """

    capabilities = Capabilities()
    example_config = {"dim": 16, "memory_dim": 16, "heads": 2, "entries": 5}

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
            check_backend(self.backend)

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """Without a learned bank (``entries=None``) the memory is a required input of the forward; the output has
        the memory's width, so the module is a token mixer only when ``memory_dim == dim``."""
        return dataclasses.replace(cls.capabilities, inputs=("memory",) if config.entries is None else (),
                                   mixer=config.memory_dim == config.dim)

    def build(self, cfg) -> None:
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim)
        self.k_proj = nn.Linear(cfg.memory_dim, cfg.heads * cfg.head_dim, bias=False)
        self.memory = nn.Parameter(torch.randn(cfg.entries, cfg.memory_dim)) if cfg.entries is not None else None

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        """Queries ``x`` ``[B, N, C_q]`` read ``memory`` ``[S, C_m]`` or ``[B, S, C_m]`` (the learned bank when
        None); returns ``[B, N, C_m]``."""
        cfg = self.config
        check_tokens("x", x, cfg.dim)
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

    def example(self, batch: int = 2, *, generator: torch.Generator | None = None) -> tuple:
        """Queries ``[batch, 7, dim]``, and a memory bank of 5 entries ``[5, memory_dim]`` when ``entries`` is None."""
        (x,) = super().example(batch, generator=generator)
        if self.memory is not None:
            return (x,)
        return x, self.example_randn(5, self.config.memory_dim, generator=generator)


def naive_memory_attention(m: MemoryAttention, x: Tensor, memory: Tensor | None = None) -> Tensor:
    """Reference of :class:`MemoryAttention` with its own weights, head by head: materialized softmax of the
    projected queries against the projected memory ``[S, C_m]`` (the learned bank when None), times the head's
    block of memory columns. ``x`` ``[B, N, C_q]`` -> ``[B, N, C_m]``."""
    memory = m.memory if memory is None else memory
    H, D, Cm = m.config.heads, m.config.head_dim, m.config.memory_dim
    outs = []
    for h in range(H):
        q = F.linear(x, m.q_proj.weight[h * D:(h + 1) * D], m.q_proj.bias[h * D:(h + 1) * D])  # (B, N, D)
        k = memory @ m.k_proj.weight[h * D:(h + 1) * D].T  # (S, D)
        p = torch.softmax(q @ k.T / math.sqrt(D), dim=-1)  # (B, N, S)
        outs.append(p @ memory[:, h * Cm // H:(h + 1) * Cm // H])  # (B, N, Cm/H)
    return torch.cat(outs, dim=-1)  # (B, N, Cm)
