"""The ground truth of causal linear attention with decay: the quadratic form, materialized. O(N^2) memory."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.ops.linear.base import NORMALIZER_EPS, check_linear_inputs, with_normalizer

__all__ = ["naive_linear_attention"]


def naive_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | float | None = None,
    *,
    scale: float = 1.0,
    normalize: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``O = s ((Q K^T) * M) V`` with ``M_ij = lambda_h^(i-j)`` for ``i >= j`` (else 0): the readable reference.

    Same arguments and results as :func:`headwise.ops.linear.chunk_linear_attention` (see there and
    :mod:`headwise.ops.linear.base` for the equations); computes every score, so use it for checking only.
    """
    lam = check_linear_inputs(q, k, v, decay, scale, normalize, initial_state)
    B, H, N, D = q.shape
    i = torch.arange(N, device=q.device)
    dist = (i[:, None] - i[None, :]).to(q.dtype)  # (N, N) i - j
    log_lam = (torch.zeros(H, dtype=torch.float64) if lam is None else lam.log()).to(q.device, q.dtype)  # (H,)
    mask = torch.exp(log_lam[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # (H, N, N) lambda^(i-j), causal
    scores = scale * (q @ k.transpose(-1, -2)) * mask  # (B, H, N, N)
    o = scores @ v  # (B, H, N, Dv)
    den = scores.sum(-1, keepdim=True)  # (B, H, N, 1) s q_i . z_i, used when normalize
    # state at the end of the sequence: sum_j lambda^(N-1-j) k_j^T v_j (+ lambda^N S0)
    tail = torch.exp(log_lam[:, None] * (N - 1 - i).to(q.dtype))  # (H, N) lambda^(N-1-j)
    v_state = with_normalizer(v) if normalize else v  # (B, H, N, Dv [+1])
    final = (k * tail[..., None]).transpose(-1, -2) @ v_state  # (B, H, D, Dv [+1])
    if initial_state is not None:
        carry = torch.exp(log_lam[:, None] * (i + 1).to(q.dtype))  # (H, N) lambda^(i+1)
        from_state = scale * carry[..., None] * (q @ initial_state)  # (B, H, N, Dv [+1])
        if normalize:
            o = o + from_state[..., :-1]
            den = den + from_state[..., -1:]
        else:
            o = o + from_state
        final = final + torch.exp(log_lam * N)[:, None, None] * initial_state
    if normalize:
        o = o / (den + NORMALIZER_EPS)  # s q_i S_i / (s q_i z_i + eps)
    return o, (final if output_final_state else None)
