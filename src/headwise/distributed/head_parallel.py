"""Head-parallel attention: sequence-sharded in, all-to-all to head shards, attention, all-to-all back.

The all-to-all alternative to ring attention (DeepSpeed-Ulysses: Jacobs et al., 2023, "DeepSpeed Ulysses:
System Optimizations for Enabling Training of Extreme Long Sequence Transformer Models"; the head-parallel
branch of "A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies"). Each rank
starts with all ``H`` heads of its ``n = N / P`` tokens; one all-to-all gives it ``H / P`` heads of all ``N``
tokens, on which it runs plain :func:`headwise.attention` (any pattern, any backend, autograd as usual); a
second all-to-all returns the output to the sequence layout. Each rank sends ``(P - 1) / P`` of its q, k, v and
output shards forward and as much backward (8 shard-sized exchanges; ring attention sends ``3 (P - 1)``
key/value shards for full attention), independent of the pattern; it needs ``H % P == 0``.

Key/value heads: when ``H_kv % P == 0`` they are split like the query heads (each rank keeps the key/value heads
its query heads read). Otherwise (MQA, or GQA with fewer key/value heads than ranks) the keys and values are
all-gathered and each rank keeps the heads its query heads read (this replicates them: ``P`` times the key/value
memory of the divisible case). Head-specific patterns are restricted to the rank's heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from headwise.core.attention import attention
from headwise.core.checks import check_qkv
from headwise.distributed.ring import check_global
from headwise.distributed.sharding import (ShardLayout, pad_to, collective, gather_sequence, layout_for, nbytes,
                                           record_communication, world_and_rank)
from headwise.patterns.base import Pattern, PerHead

__all__ = ["head_parallel_attention", "HeadSlice", "seq_to_heads", "heads_to_seq"]


class _AllToAll(torch.autograd.Function):
    """``x`` ``(P, ...)``: block ``i`` goes to rank ``i``; returns ``(P, ...)`` with block ``i`` from rank ``i``.
    Its adjoint is the same exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, group, op: str):
        ctx.group, ctx.op = group, op
        return _exchange(x, group, op)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.group, ctx.op + " backward"), None, None


def _exchange(x: Tensor, group, op: str) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    collective(op, "all_to_all", group, dist.all_to_all_single, out, x)
    moved = nbytes(x) * (x.shape[0] - 1) // x.shape[0]
    record_communication(moved, moved)
    return out


def seq_to_heads(x: Tensor, lay: ShardLayout, group=None, op: str = "head_parallel_attention") -> Tensor:
    """``[B, Hx, n, D]`` sequence shards -> ``[B, Hx / P, N, D]``: this rank's head block, every token, in order."""
    B, Hx, n, D = x.shape
    P = lay.world
    blocks = x.view(B, P, Hx // P, n, D).movedim(1, 0)  # (P, B, Hx/P, n, D): head block i goes to rank i
    got = _AllToAll.apply(blocks, group, op)  # (P, B, Hx/P, n, D): sequence shard i from rank i
    full = got.movedim(0, 2).reshape(B, Hx // P, P * n, D)  # (B, Hx/P, padded N, D) in rank order
    return full.index_select(2, lay.inverse[: lay.seq_len].to(x.device))  # (B, Hx/P, N, D)


def heads_to_seq(y: Tensor, lay: ShardLayout, group=None, op: str = "head_parallel_attention") -> Tensor:
    """Inverse of :func:`seq_to_heads`: ``[B, h, N, Dv]`` head block -> ``[B, h P, n, Dv]`` sequence shard."""
    B, h, _, Dv = y.shape
    P, n = lay.world, lay.local_len
    ranked = pad_to(y, 2, lay.padded_len).index_select(2, lay.order.to(y.device))  # (B, h, P n, Dv) rank order
    blocks = ranked.view(B, h, P, n, Dv).movedim(2, 0)  # (P, B, h, n, Dv): sequence shard i goes to rank i
    got = _AllToAll.apply(blocks, group, op)  # (P, B, h, n, Dv): head block i from rank i
    return got.movedim(0, 1).reshape(B, P * h, n, Dv)  # (B, H, n, Dv)


@dataclass(frozen=True)
class HeadSlice(Pattern):
    """Heads ``first .. first + count - 1`` of a head-specific pattern, renumbered from 0."""

    pattern: Pattern  # head-specific pattern (pattern.heads is not None)
    first: int  # first head kept
    count: int  # heads kept

    def __post_init__(self):
        object.__setattr__(self, "heads", self.count)

    def check(self, n_q, n_kv):
        self.pattern.check(n_q, n_kv)

    def mask(self, q_idx, kv_idx, head=None):
        if head is None:
            raise ValueError("HeadSlice.mask needs head= (an int or a tensor of head indices)")
        return self.pattern.mask(q_idx, kv_idx, head + self.first)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None):
        if head is None:
            raise ValueError("HeadSlice.tile_schedule needs head= (each head has its own schedule)")
        return self.pattern.tile_schedule(n_q, n_kv, tile_q, tile_kv, head=head + self.first)


def _local_pattern(pattern: Pattern | None, first: int, count: int) -> Pattern | None:
    if pattern is None or pattern.heads is None:
        return pattern
    if isinstance(pattern, PerHead):
        return PerHead(pattern.patterns[first: first + count])
    return HeadSlice(pattern, first, count)


def head_parallel_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None = None, group=None, *,
                            seq_len: int | None = None, layout: str = "zigzag", scale: float | None = None,
                            backend: str = "auto") -> Tensor:
    """Context-parallel attention by all-to-all: sequence shards in, head shards attend, sequence shards out.

    Same contract as :func:`headwise.distributed.ring_attention` (every rank of ``group`` calls it with its shards;
    ``gather_sequence`` of the result equals ``headwise.attention(q, k, v, pattern)``, forward and backward),
    for ``H`` divisible by the number of ranks ``P`` (module docstring).

    Args:
        q: ``[B, H, n, D]`` this rank's query shard; ``H % P == 0``.
        k: ``[B, H_kv, n, D]``, v: ``[B, H_kv, n, Dv]`` key and value shards.
        pattern: a :class:`headwise.patterns.Pattern` on global positions (``None``: full attention).
        group, seq_len, layout, scale: as in :func:`~headwise.distributed.ring_attention`.
        backend: the :func:`headwise.attention` backend each rank runs on its heads (default ``"auto"``).

    Returns:
        ``[B, H, n, Dv]`` this rank's output shard (zeros on padded rows).
    """
    check_qkv(q, k, v, None, scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head_parallel_attention is self-attention: q and k shards must have one length, got "
                         f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    P, r = world_and_rank(group)
    lay = layout_for(q.shape[2], P, layout, seq_len)
    check_global(q, k, v, pattern, lay.seq_len)
    H, H_kv = q.shape[1], k.shape[1]
    if H % P:
        raise ValueError(f"head_parallel_attention needs the query heads divisible by the ranks, got H={H} and "
                         f"P={P}; use ring_attention")
    h = H // P
    q_h = seq_to_heads(q, lay, group)  # (B, h, N, D)
    if H_kv % P == 0:
        k_h, v_h = seq_to_heads(k, lay, group), seq_to_heads(v, lay, group)  # (B, H_kv/P, N, D)
    else:  # replicate: all-gather the keys and values, keep the heads our query heads read
        g = H // H_kv
        reads = torch.arange(r * h, (r + 1) * h) // g  # (h,) kv head of each local query head
        kept, per_kept = torch.unique_consecutive(reads, return_counts=True)
        idx = kept if bool((per_kept == per_kept[0]).all()) else reads  # uniform groups: local GQA; else MHA
        k_full = gather_sequence(k, 2, layout, group, lay.seq_len)  # (B, H_kv, N, D)
        v_full = gather_sequence(v, 2, layout, group, lay.seq_len)
        k_h, v_h = k_full.index_select(1, idx.to(k.device)), v_full.index_select(1, idx.to(v.device))
    out = attention(q_h, k_h, v_h, _local_pattern(pattern, r * h, h), scale=scale, backend=backend)  # (B, h, N, Dv)
    return heads_to_seq(out, lay, group)
