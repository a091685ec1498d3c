"""Input validation shared by every backend: clear errors that name the argument and its value."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.patterns.base import Pattern


def check_tensors(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k, v are 4-D ``[B, H, N, D]`` floating-point tensors of one dtype on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, N, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got {name}.shape={tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {name}.dtype={t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device=}, {k.device=}, {v.device=}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, scale: float | None) -> None:
    check_tensors(q, k, v)
    B, H, _, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch sizes differ: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same heads: k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length: k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    H_kv = k.shape[1]
    if H_kv < 1 or H % H_kv:
        raise ValueError(f"query heads must be a multiple of key/value heads, got {H=} and {H_kv=}")
    if min(q.shape[2], k.shape[2], D, v.shape[3]) < 1:
        raise ValueError(f"empty dimension: q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}")
    if scale is not None and (not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive number or None, got {scale=!r}")
    if pattern is not None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a headwise Pattern or None, got {type(pattern).__name__}: {pattern!r}")
        pattern.check(q.shape[2], k.shape[2])
        if pattern.heads is not None and pattern.heads != H:
            raise ValueError(f"head-specific pattern has {pattern.heads} heads but q has {H=}")


def default_scale(q: Tensor, scale: float | None) -> float:
    return float(scale) if scale is not None else q.shape[-1] ** -0.5


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
