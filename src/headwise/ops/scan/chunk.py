"""The selective scan, ``chunk`` time steps at a time (all pairs of a chunk at once, the state carried between
chunks); reference: :func:`headwise.ops.scan.naive.recurrent_selective_scan`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from headwise.checks import check_positive_int

__all__ = ["chunk_selective_scan"]


def chunk_selective_scan(x: Tensor, delta: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor,
                         chunk: int = 32) -> Tensor:
    r"""The selective scan of :func:`~headwise.ops.scan.recurrent_selective_scan`, ``chunk`` steps at a time.

    Within a chunk, with ``P_t = \sum_{r \le t} delta_r A`` (cumulative log-decay from the chunk start) and
    ``u_s = (delta_s x_s) B_s``: ``h_t = exp(P_t) h_0 + \sum_{s \le t} exp(P_t - P_s) u_s`` -- all pairs
    ``(t, s)`` of the chunk at once (the exponent is masked to ``-inf`` above the diagonal before ``exp``, so
    nothing overflows); the last state carries to the next chunk. Same shapes and result as the reference.
    It materializes ``[B, K, T, T, d, n]`` per chunk of ``T`` steps.

    Example:
        >>> import torch
        >>> from headwise.ops.scan import recurrent_selective_scan
        >>> args = (torch.randn(2, 3, 9, 4, dtype=torch.float64), torch.rand(2, 3, 9, 4, dtype=torch.float64),
        ...         -torch.rand(3, 4, 6, dtype=torch.float64), torch.randn(2, 3, 9, 6, dtype=torch.float64),
        ...         torch.randn(2, 3, 9, 6, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64))
        >>> torch.allclose(chunk_selective_scan(*args, chunk=4), recurrent_selective_scan(*args))
        True
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
