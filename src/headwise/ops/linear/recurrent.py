"""Causal linear attention with decay, token by token: the decoding path (one step per generated token)."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.ops.linear.base import apply_normalizer, check_linear_inputs, with_normalizer

__all__ = ["recurrent_linear_attention"]


def recurrent_linear_attention(
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
    """The recurrence ``S_i = lambda S_{i-1} + k_i^T v_i``, ``o_i = s q_i S_i``, one token at a time.

    Same arguments and results as :func:`headwise.ops.linear.chunk_linear_attention`. O(N) Python steps: use it to
    decode (``N = 1`` per call, the state carried between calls), the chunked op for a prompt or training.

    Example:
        >>> import torch
        >>> from headwise.ops.linear import recurrent_linear_attention, decay_rates
        >>> q = k = v = torch.randn(1, 8, 1, 64)                         # one new token, [B, H, 1, D]
        >>> state = torch.zeros(1, 8, 64, 64)                             # [B, H, D, Dv]
        >>> o, state = recurrent_linear_attention(q, k, v, decay_rates(8), initial_state=state,
        ...                                       output_final_state=True)
    """
    lam = check_linear_inputs(q, k, v, decay, scale, normalize, initial_state)
    if normalize:
        v = with_normalizer(v)  # (B, H, N, Dv + 1)
    B, H, _, D = q.shape
    state = initial_state if initial_state is not None else q.new_zeros(B, H, D, v.shape[-1])  # (B, H, D, Dv)
    lam_h = None if lam is None else lam.to(q.device, q.dtype)[:, None, None]  # (H, 1, 1)
    outs = []
    # unbind once: indexing q[:, :, i] per step would give each step's backward a full-size zero gradient
    for q_i, k_i, v_i in zip(q.unbind(2), k.unbind(2), v.unbind(2)):  # (B, H, D), (B, H, D), (B, H, Dv)
        update = k_i[..., :, None] * v_i[..., None, :]  # (B, H, D, Dv) k_i^T v_i
        state = update + (state if lam_h is None else lam_h * state)
        outs.append(scale * (q_i[..., None, :] @ state))  # (B, H, 1, Dv)
    o = torch.cat(outs, dim=2)  # (B, H, N, Dv)
    if normalize:
        o = apply_normalizer(o)
    return o, (state if output_final_state else None)
