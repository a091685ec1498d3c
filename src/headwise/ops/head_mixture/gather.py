"""The head mixture computing each head only for the tokens that use it (the fast path of MoH's sparse compute).

Same result as :func:`~headwise.ops.head_mixture.dense_head_mixture` (forward and gradients), its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.core.attention import attention
from headwise.ops.head_mixture.naive import check_mixture
from headwise.ops.head_mixture.restrict import restrict
from headwise.patterns import Full, Pattern

__all__ = ["gather_head_mixture"]


def gather_head_mixture(
    q: Tensor, k: Tensor, v: Tensor, gates: Tensor, active: Tensor, pattern: Pattern | None = None,
    *, scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Per-token weighted sum of heads computing each head only for the tokens that use it.

    Same result as :func:`~headwise.ops.head_mixture.dense_head_mixture` (forward and gradients). Heads every
    token uses (MoH's shared heads) run in one :func:`headwise.attention` call; for each other head the queries
    of the tokens that selected it are gathered and attend to all keys of the head (a pattern is kept exact by
    evaluating it at the gathered positions, :class:`~headwise.ops.head_mixture.Restricted`), and the weighted
    outputs are scattered back. A token's unselected heads cost nothing, so the work is
    ``sum_h (tokens using h) x M`` instead of ``H x N x M``.

    Shapes as in :func:`~headwise.ops.head_mixture.dense_head_mixture`: returns ``[B, N, H, Dv]``. With ``B > 1``
    the gathered queries of a head are padded to the largest count in the batch (the padding rows get weight 0);
    with ``B > 1`` and a pattern, one call per batch element.

    Speed: one attention call per routed head (and one host synchronisation to size it). On CPUs, where the
    attention itself dominates, the skipped work turns into time; on a GPU at moderate sizes the many small
    launches cost more than they save, and :func:`~headwise.ops.head_mixture.dense_head_mixture` is the faster
    choice.
    """
    check_mixture(q, gates, active)
    B, H, N, _ = q.shape
    H_kv, Dv = k.shape[1], v.shape[-1]
    group = H // H_kv
    w = torch.where(active, gates, torch.zeros((), dtype=gates.dtype, device=gates.device)).to(q.dtype)  # (B, N, H)
    out = q.new_zeros(B, N, H, Dv)  # every head writes its slice; unselected (token, head) pairs stay zero
    everywhere = active.all(dim=1).all(dim=0).cpu()  # (H,) heads every token uses (a host synchronisation)
    dense = everywhere.nonzero().flatten()
    if dense.numel():
        qd, kd, vd = _qkv_of_heads(q, k, v, dense)
        o = attention(qd, kd, vd, restrict(pattern, N, None, dense, H), scale=scale, backend=backend)  # (B, L, N, Dv)
        out[:, :, dense] = o.transpose(1, 2) * w[:, :, dense, None]
    for h in (~everywhere).nonzero().flatten().tolist():  # one call per routed head
        _gather_one_head(out[:, :, h], q, k[:, h // group : h // group + 1], v[:, h // group : h // group + 1],
                         w[:, :, h], active[:, :, h], h, pattern, scale, backend)
    return out  # (B, N, H, Dv)


def _qkv_of_heads(q: Tensor, k: Tensor, v: Tensor, heads: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries of ``heads`` (ascending ids) and the keys and values they read: slices when the heads are
    consecutive (and, for keys and values, whole GQA groups, keeping the broadcast), else copies with one
    key/value head per query head."""
    group = q.shape[1] // k.shape[1]
    first, n = int(heads[0]), heads.numel()
    if not bool((heads == torch.arange(first, first + n)).all()):
        kv = heads // group
        return q[:, heads], k[:, kv], v[:, kv]  # (B, n, N, D), (B, n, M, D), (B, n, M, Dv)
    q = q[:, first : first + n]  # (B, n, N, D)
    if first % group == 0 and n % group == 0:
        return q, k[:, first // group : (first + n) // group], v[:, first // group : (first + n) // group]
    kv = heads // group
    return q, k[:, kv], v[:, kv]


def _gather_one_head(out_h, q, k_h, v_h, w_h, sel, h, pattern, scale, backend) -> None:
    """Write head ``h``, computed for its selected tokens only, into ``out_h`` ``[B, N, Dv]`` (zeros), where
    ``sel`` ``[B, N]`` is True."""
    B, H, N, D = q.shape
    Dv = v_h.shape[-1]
    counts = sel.sum(1)  # (B,)
    c = int(counts.max())  # a host synchronisation
    if c == 0:
        return
    # selected positions first, in ascending order (a stable sort of the "not selected" flags)
    order = torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices[:, :c]  # (B, c)
    q_sel = q[:, h].gather(1, order[..., None].expand(B, c, D))[:, None]  # (B, 1, c, D)
    head = torch.tensor([h])
    if pattern is None or isinstance(pattern, Full):
        o = attention(q_sel, k_h, v_h, None, scale=scale, backend=backend)[:, 0]  # (B, c, Dv)
    else:  # the pattern is evaluated at the gathered positions, which differ per batch element
        parts = []
        for b in range(B):
            n_b = int(counts[b])
            if n_b == 0:
                parts.append(q.new_zeros(c, Dv))
                continue
            rows = order[b, :n_b]
            o_b = attention(q_sel[b : b + 1, :, :n_b], k_h[b : b + 1], v_h[b : b + 1],
                            restrict(pattern, N, rows, head, H), scale=scale, backend=backend)[0, 0]  # (n_b, Dv)
            parts.append(F.pad(o_b, (0, 0, 0, c - n_b)))
        o = torch.stack(parts)  # (B, c, Dv)
    contrib = o * w_h.gather(1, order)[..., None]  # (B, c, Dv); padding rows are unselected tokens: weight 0
    out_h.scatter_(1, order[..., None].expand(B, c, Dv), contrib)  # (B, N, Dv)
