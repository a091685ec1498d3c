"""Reference of CMHA: the score materialized in polar form, as ComplexFormer writes it."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.checks import default_scale
from headwise.ops.complex.complex import polar
from headwise.patterns import Pattern

__all__ = ["naive_complex_attention"]


def naive_complex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phase_scale: Tensor,
    phase_shift: Tensor,
    freq: Tensor,
    pattern: Pattern | None = None,
    scale: float | None = None,
) -> Tensor:
    """CMHA attention with the score materialized in polar form, as ComplexFormer writes it.

    ``q`` ``[B, H, N, D]``, ``k`` ``[B, H, M, D]``, ``v`` ``[B, H, M, Dv]`` -> ``[B, H, N, Dv]``:
    ``s_mn = scale * sum_j |q_mj| |k_nj| cos(Adapt_h(AS_mnj) + Delta_hj(m - n))`` with the semantic angle
    difference ``AS_mnj = theta(q_mj) - theta(k_nj)``, ``Adapt_h(a) = phase_scale_hj * a + phase_shift_hj`` and
    ``Delta_hj(p) = freq_hj * p``. Fully-masked rows give zeros.
    """
    N, M = q.shape[2], k.shape[2]
    rq, tq = polar(q)  # (B, H, N, D/2)
    rk, tk = polar(k)  # (B, H, M, D/2)
    semantic = tq[:, :, :, None, :] - tk[:, :, None, :, :]  # (B, H, N, M, D/2): AS_mn
    rel = (torch.arange(N, device=q.device)[:, None] - torch.arange(M, device=q.device)[None, :]).to(q.dtype)  # (N, M)
    angle = phase_scale[:, None, None] * semantic + phase_shift[:, None, None] + freq[:, None, None] * rel[..., None]
    s = (rq[:, :, :, None, :] * rk[:, :, None, :, :] * torch.cos(angle)).sum(-1)  # (B, H, N, M)
    s = s * default_scale(q, scale)
    if pattern is not None:
        s = s.masked_fill(~pattern.dense_mask(N, M, device=q.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully-masked rows -> 0
    return p @ v  # (B, H, N, Dv)
