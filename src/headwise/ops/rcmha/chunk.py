"""RCMHA's relative attention ``chunk`` query rows at a time, each chunk one fused SDPA call with an additive bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.core.checks import default_scale
from headwise.ops.rcmha.naive import relative_index

__all__ = ["chunk_rcmha_attention"]


def chunk_rcmha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_query_bias: Tensor,
    rel_key: Tensor,
    rel_bias: Tensor,
    max_distance: int,
    causal: bool = False,
    scale: float | None = None,
    chunk: int = 512,
) -> Tensor:
    """:func:`~headwise.ops.rcmha.naive_rcmha_attention` computed ``chunk`` query rows at a time (same result).

    Per chunk, the position terms of every relative distance form a small table
    ``T = scale * (q . R_r + S_r)`` ``[B, H, chunk, 2K+1]`` (with ``-inf`` for negative distances when
    ``causal``: those keys are in the future); one ``gather`` expands it into the ``[B, H, chunk, M]`` additive
    bias and one fused ``scaled_dot_product_attention`` call applies it. Memory ``O(chunk * M)`` per call.
    Shapes and arguments as the reference.
    """
    B, H, N, D = q.shape
    M = k.shape[2]
    s = default_scale(q, scale)
    K = max_distance
    qu = q + pos_query_bias[:, None]  # (B, H, N, D)
    kv_pos = torch.arange(M, device=q.device)
    outs = []
    for i0 in range(0, N, chunk):
        qc = q[:, :, i0 : i0 + chunk]  # (B, H, c, D)
        c = qc.shape[2]
        table = (torch.einsum("bhcd,rhd->bhcr", qc, rel_key) + rel_bias.T[:, None]) * s  # (B, H, c, 2K+1)
        if causal:
            table[..., :K] = float("-inf")  # relative distance i - j < 0
        rel = relative_index(torch.arange(i0, i0 + c, device=q.device), kv_pos, K)  # (c, M)
        bias = torch.gather(table, -1, rel.expand(B, H, c, M))  # (B, H, c, M)
        outs.append(F.scaled_dot_product_attention(qu[:, :, i0 : i0 + c], k, v, attn_mask=bias, scale=s))
    return torch.cat(outs, dim=2)  # (B, H, N, Dv)
