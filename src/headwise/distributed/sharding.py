"""Sequence sharding for context parallelism: which tokens each rank holds, and the collectives that move them.

A sequence of ``N`` tokens is cut into equal chunks and dealt to the ``P`` ranks of a process group:

* ``"contiguous"``: ``P`` chunks of ``c = ceil(N / P)`` tokens; rank ``r`` holds chunk ``r``.
* ``"zigzag"`` (default): ``2 P`` chunks of ``c = ceil(N / 2P)`` tokens; rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r`` (one early, one late), so that under causal attention every rank has the same number of
  (query, key) pairs to compute (the load balancing of Striped/Zigzag Ring Attention; Brandon et al., 2023;
  the "zigzag" layout of ring-flash-attention and Megatron-LM context parallelism).

Padding: when ``N`` is not a multiple of the number of chunks, the sequence is padded at its end with zeros to
``padded_len = c x chunks`` tokens, so every rank holds a shard of the same length ``local_len`` (the padded
positions are the last ones of the last chunk(s)). The attention functions of :mod:`headwise.distributed` take
the real length ``seq_len`` and never let a padded key be attended; padded query rows come out as zeros.
:func:`gather_sequence` drops the padding again. Shapes: a shard of ``x [B, H, N, D]`` (``dim=2``) is
``[B, H, local_len, D]``; any ``dim`` works (``[B, N, C]`` with ``dim=1``).

Gradients follow the rule "the loss is the sum of every rank's loss": :func:`shard_sequence` passes back the
gradient of the rank's own positions (zeros elsewhere; sum over ranks for a replicated input, as DDP does), and
:func:`gather_sequence`'s backward sums the gradients of all ranks and returns each its own shard's part
(reduce-scatter, the adjoint of all-gather).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from headwise.patterns.base import ceil_div

__all__ = ["ShardLayout", "LAYOUTS", "shard_sequence", "gather_sequence", "all_gather_cat", "layout_for",
           "world_and_rank", "CommCounter", "count_communication", "comm_error", "collective"]

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class ShardLayout:
    """Where the tokens of a sequence of ``seq_len`` tokens live on ``world`` ranks (module docstring)."""

    seq_len: int  # N, real tokens (before padding)
    world: int  # P, ranks in the group
    layout: str = "zigzag"  # "zigzag" (2 chunks per rank, causal load balance) or "contiguous" (1 chunk)

    def __post_init__(self):
        for name in ("seq_len", "world"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout={self.layout!r}; valid: {', '.join(map(repr, LAYOUTS))}")

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    @property
    def n_chunks(self) -> int:
        return self.world * self.chunks_per_rank

    @property
    def chunk(self) -> int:
        """Tokens per chunk, ``c``."""
        return ceil_div(self.seq_len, self.n_chunks)

    @property
    def local_len(self) -> int:
        """Tokens per shard (padding included)."""
        return self.chunk * self.chunks_per_rank

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world

    def chunk_ids(self, rank: int) -> tuple[int, ...]:
        """The chunks rank ``rank`` holds, in shard order."""
        if self.layout == "zigzag":
            return (rank, self.n_chunks - 1 - rank)
        return (rank,)

    def chunks(self, rank: int) -> list[tuple[int, int, int]]:
        """``(global_start, real_tokens, offset_in_shard)`` of each chunk of rank ``rank`` (``real_tokens`` may be
        smaller than ``chunk``, or 0, where the chunk holds padding)."""
        c = self.chunk
        return [(i * c, max(0, min(c, self.seq_len - i * c)), j * c) for j, i in enumerate(self.chunk_ids(rank))]

    def positions(self, rank: int) -> Tensor:
        """``(local_len,)`` int64: the global position of each shard row (``>= seq_len`` for padding)."""
        c = self.chunk
        return torch.cat([torch.arange(i * c, (i + 1) * c) for i in self.chunk_ids(rank)])

    @functools.cached_property
    def order(self) -> Tensor:
        """``(padded_len,)`` int64: global positions of the shards concatenated in rank order."""
        return torch.cat([self.positions(r) for r in range(self.world)])

    @functools.cached_property
    def inverse(self) -> Tensor:
        """``(padded_len,)`` int64: where global position ``i`` sits in the rank-ordered concatenation."""
        return torch.argsort(self.order)


@dataclass
class CommCounter:
    """Bytes this process sent and received through headwise.distributed's collectives and point-to-point ops
    (payload only; what each rank's own shard contributes to a collective is not counted)."""

    bytes_sent: int = 0  # payload bytes this rank sent
    bytes_received: int = 0  # payload bytes this rank received
    messages: int = 0  # point-to-point sends, plus one per collective call

    def add(self, sent: int, received: int, messages: int = 1) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.messages += messages


_COUNTERS: list[CommCounter] = []


@contextmanager
def count_communication():
    """Count the communication of headwise.distributed calls in this process while the block runs (in each of P
    processes of a process group; not a doctest)::

        with count_communication() as c:
            out = ring_attention(q, k, v, Causal(), seq_len=n)
        c.bytes_sent
    """
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def record_communication(sent: int, received: int, messages: int = 1) -> None:
    for c in _COUNTERS:
        c.add(sent, received, messages)


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def comm_error(op: str, group, doing: str, error: Exception) -> RuntimeError:
    """The error every headwise.distributed communication raises when a peer fails: what, where, and why."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return RuntimeError(f"{op} on rank {rank} of {world}: {doing} failed; another rank probably raised or exited "
                        f"(its own error is the root cause), or the process group timed out "
                        f"(init_process_group(timeout=...)). Backend error: {error}")


def collective(op: str, doing: str, group, fn, *args, **kwargs):
    """Run the collective ``fn(*args, **kwargs)``, turning a backend failure into :func:`comm_error`."""
    try:
        return fn(*args, group=group, **kwargs)
    except RuntimeError as e:
        raise comm_error(op, group, doing, e) from e


def world_and_rank(group=None) -> tuple[int, int]:
    """``(world size, rank)`` of ``group`` (default: the world), with a clear error before initialization."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "(or launch with torchrun) before using headwise.distributed")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_dim(x: Tensor, dim: int) -> int:
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{dim=} out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def pad_to(x: Tensor, dim: int, length: int) -> Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def shard_sequence(x: Tensor, dim: int = 2, layout: str = "zigzag", group=None) -> Tensor:
    """This rank's shard of the full sequence ``x`` (the same ``x`` on every rank), padded with zeros.

    Args:
        x: the full tensor, e.g. ``[B, H, N, D]`` (``dim=2``) or ``[B, N, C]`` (``dim=1``).
        dim: the sequence dimension.
        layout: ``"zigzag"`` (default) or ``"contiguous"`` (module docstring).
        group: the process group (default: the world).

    Returns:
        ``x`` restricted to this rank's positions, ``local_len = ShardLayout(N, P, layout).local_len`` along
        ``dim``. Differentiable (the gradient reaches this rank's positions of ``x`` only).

    Example (each of P processes of a process group; not a doctest)::

        q_shard = shard_sequence(q)                       # [B, H, local_len, D]
        out = ring_attention(q_shard, k_shard, v_shard, Causal(), seq_len=q.shape[2])
        full = gather_sequence(out, seq_len=q.shape[2])   # [B, H, N, D] on every rank
    """
    dim = _check_dim(x, dim)
    world, rank = world_and_rank(group)
    lay = ShardLayout(x.shape[dim], world, layout)
    return pad_to(x, dim, lay.padded_len).index_select(dim, lay.positions(rank).to(x.device))


class _AllGather(torch.autograd.Function):
    """Concatenate the shards of every rank along ``dim`` in rank order; backward: sum over ranks, own part."""

    @staticmethod
    def forward(ctx, shard: Tensor, dim: int, group):
        world, rank = world_and_rank(group)
        ctx.dim, ctx.group, ctx.rank, ctx.n = dim, group, rank, shard.shape[dim]
        parts = [torch.empty_like(shard, memory_format=torch.contiguous_format) for _ in range(world)]
        collective("gather_sequence", "all_gather", group, dist.all_gather, parts, shard.contiguous())
        record_communication(nbytes(shard) * (world - 1), nbytes(shard) * (world - 1))
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        collective("gather_sequence backward", "all_reduce", ctx.group, dist.all_reduce, grad)
        world = dist.get_world_size(ctx.group)  # a ring all-reduce moves about 2 (P - 1) / P of the tensor each way
        record_communication(2 * nbytes(grad) * (world - 1) // world, 2 * nbytes(grad) * (world - 1) // world)
        return grad.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n), None, None


def all_gather_cat(shard: Tensor, dim: int, group=None) -> Tensor:
    """Differentiable all-gather: the shards of every rank concatenated along ``dim`` in rank order."""
    return _AllGather.apply(shard, dim, group)


def gather_sequence(shard: Tensor, dim: int = 2, layout: str = "zigzag", group=None,
                    seq_len: int | None = None) -> Tensor:
    """Reassemble the full sequence, in the original order and without padding, on every rank.

    Args:
        shard: this rank's shard, ``local_len`` along ``dim``.
        dim, layout, group: as given to :func:`shard_sequence`.
        seq_len: the real length ``N``; default ``local_len x P`` (no padding). Pass it whenever ``N`` is not a
            multiple of the number of chunks (``2P`` for zigzag, ``P`` for contiguous).

    Returns:
        The full tensor, ``seq_len`` along ``dim``. Differentiable (the backward sums every rank's gradient and
        returns each rank its own shard's part).
    """
    dim = _check_dim(shard, dim)
    world, _ = world_and_rank(group)
    lay = layout_for(shard.shape[dim], world, layout, seq_len)
    full = all_gather_cat(shard, dim, group)  # padded, in rank order
    return full.index_select(dim, lay.inverse[: lay.seq_len].to(shard.device))


def layout_for(local_len: int, world: int, layout: str, seq_len: int | None) -> ShardLayout:
    """The :class:`ShardLayout` of shards of ``local_len`` tokens, checking that ``seq_len`` is consistent."""
    if seq_len is None:
        seq_len = local_len * world
    lay = ShardLayout(seq_len, world, layout)
    if lay.local_len != local_len:
        raise ValueError(f"a shard of {local_len} tokens does not match {seq_len=} on {world} ranks with "
                         f"{layout=} (expected shards of {lay.local_len} tokens); pass the real seq_len")
    return lay
