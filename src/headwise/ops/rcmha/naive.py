"""Reference of RCMHA's relative attention: the full score materialized (Transformer-XL's four terms)."""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.core.checks import default_scale

__all__ = ["naive_rcmha_attention", "relative_index"]


def relative_index(q_pos: Tensor, kv_pos: Tensor, max_distance: int) -> Tensor:
    """``[n_q, n_kv]`` indices ``clamp(i - j, -K, K) + K`` into a table of ``2K + 1`` relative positions.

    Example:
        >>> import torch
        >>> relative_index(torch.arange(3), torch.arange(4), max_distance=1)
        tensor([[1, 0, 0, 0],
                [2, 1, 0, 0],
                [2, 2, 1, 0]])
    """
    return (q_pos[:, None] - kv_pos[None, :]).clamp(-max_distance, max_distance) + max_distance


def naive_rcmha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_query_bias: Tensor,
    rel_key: Tensor,
    rel_bias: Tensor,
    max_distance: int,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """RCMHA's relative attention with the full score materialized (Transformer-XL's four terms).

    ``s_ij = scale * ((q_i + u) . k_j + q_i . R_{c(i-j)} + S_{c(i-j)})``, ``c`` clipping ``i - j`` to
    ``[-K, K]``. ``q, k`` ``[B, H, N, D]``, ``v`` ``[B, H, N, Dv]``, ``pos_query_bias`` (``u``) ``[H, D]``,
    ``rel_key`` (``R``) ``[2K+1, H, D]``, ``rel_bias`` (``S``) ``[2K+1, H]`` -> ``[B, H, N, Dv]``.
    """
    N, M = q.shape[2], k.shape[2]
    rel = relative_index(torch.arange(N, device=q.device), torch.arange(M, device=q.device), max_distance)  # (N, M)
    content = (q + pos_query_bias[:, None]) @ k.transpose(-1, -2)  # (B, H, N, M): terms (a) + (c)
    R = rel_key[rel]  # (N, M, H, D)
    position = torch.einsum("bhnd,nmhd->bhnm", q, R) + rel_bias[rel].permute(2, 0, 1)  # (B, H, N, M): (b) + (d)
    s = (content + position) * default_scale(q, scale)
    if causal:
        s = s.masked_fill(torch.ones(N, M, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # (B, H, N, Dv)
