"""``ContextParallel``: run a softmax attention module on a sequence sharded over ranks; data-parallel training
of the arena's models (``data_parallel_train``, ``init_from_env`` for ``torchrun``)."""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from headwise.distributed.head_parallel import head_parallel_attention
from headwise.distributed.ring import ring_attention
from headwise.distributed.sharding import LAYOUTS, collective, world_and_rank
from headwise.variants.mha import MultiHeadAttention

__all__ = ["ContextParallel", "METHODS", "supports", "shard_batch", "data_parallel_train", "init_from_env",
           "DataParallel"]

METHODS = {"ring": ring_attention, "heads": head_parallel_attention}


def supports(module: nn.Module) -> bool:
    """True for :class:`~headwise.variants.mha.MultiHeadAttention` and its subclasses that keep its
    ``project`` and ``forward`` (registered: ``mha``, ``gqa``, ``mqa``): projections per token, then
    :func:`headwise.attention` with the module's pattern, then the output projection."""
    cls = type(module)
    return (isinstance(module, MultiHeadAttention) and cls.forward is MultiHeadAttention.forward
            and cls.project is MultiHeadAttention.project)


class ContextParallel(nn.Module):
    """Wrap a softmax attention module so that it runs on this rank's shard of the sequence.

    ``ContextParallel(m)(shard_sequence(x, dim=1))`` on every rank of the group equals
    ``shard_sequence(m(x), dim=1)``: the per-token projections run on the shard, the attention runs context-
    parallel (``method="ring"``: :func:`~headwise.distributed.ring_attention`, any pattern; ``"heads"``:
    :func:`~headwise.distributed.head_parallel_attention`, heads divisible by the ranks) with the module's own
    pattern on global positions, then the output projection and dropout run on the shard.

    Supported modules: see :func:`supports` (``mha``, ``gqa``, ``mqa``); others raise ``TypeError`` (their forward
    does more than project-attend-project, e.g. positional terms that need global positions). Not supported:
    cross-attention (``context``) and ``key_padding_mask``. The module's ``backend`` is used by
    ``method="heads"``; the ring always runs the block-sparse engine (it needs the log-sum-exp).

    Parameter gradients: each rank's backward gives the gradient of its own tokens' loss; the gradient of the
    whole sequence is their sum over the group (:meth:`sync_gradients`; DDP over a data-parallel group averages
    on top of that).

    Args:
        module: the attention module (its parameters must be identical on every rank, e.g. same seed).
        group: the process group (default: the world).
        method: ``"ring"`` (default) or ``"heads"``.
        layout: the sequence layout of the shards, ``"zigzag"`` (default) or ``"contiguous"``.

    Shapes: ``x`` ``[B, n, C]`` (this rank's shard, ``dim=1``) -> ``[B, n, C]``.
    """

    def __init__(self, module: nn.Module, *, group=None, method: str = "ring", layout: str = "zigzag"):
        super().__init__()
        if not supports(module):
            raise TypeError(f"ContextParallel supports MultiHeadAttention modules with its forward (mha, gqa, "
                            f"mqa), got {type(module).__name__}")
        if method not in METHODS:
            raise ValueError(f"unknown {method=}; valid: {', '.join(map(repr, METHODS))}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown {layout=}; valid: {', '.join(map(repr, LAYOUTS))}")
        self.module, self.group, self.method, self.layout = module, group, method, layout

    def forward(self, x: Tensor, *, seq_len: int | None = None) -> Tensor:
        """``x`` ``[B, n, C]``: this rank's shard; ``seq_len``: the real length ``N`` (when padded)."""
        m = self.module
        q, k, v = m.project(x)  # (B, H, n, D), 2 x (B, H_kv, n, D)
        kw = dict(seq_len=seq_len, layout=self.layout)
        if self.method == "heads":
            kw["backend"] = m.backend
        out = METHODS[self.method](q, k, v, m.pattern, self.group, **kw)  # (B, H, n, D)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, n, H*D)
        return m.dropout(m.out_proj(out))  # (B, n, C)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Sum every parameter's gradient over the group (the gradient of the whole sequence's loss)."""
        world_and_rank(self.group)
        for p in self.module.parameters():
            if p.grad is not None:
                collective("ContextParallel.sync_gradients", "all_reduce", self.group, dist.all_reduce, p.grad)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, layout={self.layout!r}"


# ---- data parallelism ------------------------------------------------------------------------------------
def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``MASTER_PORT`` or its rendezvous); returns True when running distributed.

    Does nothing (returns False) outside ``torchrun`` or with ``WORLD_SIZE=1``; returns True if a group already
    exists. ``backend``: default ``"nccl"`` when CUDA is available, else ``"gloo"``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return True


def shard_batch(batch: Any, group=None) -> Any:
    """This rank's equal slice along dim 0 of every tensor in ``batch`` (a tensor, or tuples, lists and dicts of
    them; other values pass through). The batch size must be divisible by the number of ranks."""
    world, rank = world_and_rank(group)
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] % world:
            raise ValueError(f"a data-parallel batch must split evenly over {world} ranks along dim 0, got "
                             f"shape={tuple(batch.shape)}")
        n = batch.shape[0] // world
        return batch[rank * n:(rank + 1) * n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(b, group) for b in batch)
    if isinstance(batch, dict):
        return {key: shard_batch(b, group) for key, b in batch.items()}
    return batch


class DataParallel(nn.parallel.DistributedDataParallel):
    """``DistributedDataParallel`` whose ``state_dict`` is the wrapped module's (no ``module.`` prefix), so a
    checkpoint written by a data-parallel run resumes in one process and the other way round."""

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def data_parallel_train(model: nn.Module, batch_fn: Callable[[int], Any], loss_fn: Callable, *, group=None,
                        **train_kwargs):
    """:func:`headwise.arena.train.train` with data parallelism over ``group`` when torch.distributed runs with more
    than one rank (otherwise exactly ``train``).

    ``batch_fn(step)`` returns the global batch (the same on every rank: a pure function of the step); each rank
    trains on its slice (:func:`shard_batch`) of a :class:`DataParallel` (DDP) model, whose gradients are averaged
    over the ranks: with a loss that is a mean over equally weighted examples, the parameters after each step
    equal single-process training on the whole batch (tested). Only rank 0 writes the checkpoint; every rank
    reads it when resuming (a shared filesystem path). The model's parameters are broadcast from rank 0 when
    wrapped. Returns the :class:`~headwise.arena.train.TrainResult` (losses: this rank's slice).
    """
    from headwise.arena.train import train

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return train(model, batch_fn, loss_fn, **train_kwargs)
    _, rank = world_and_rank(group)
    ddp = DataParallel(model, process_group=group)
    if train_kwargs.get("checkpoint") is not None:  # rank 0 has finished writing (also after an interruption)
        collective("data_parallel_train", "barrier", group, dist.barrier)
    result = train(ddp, lambda step: shard_batch(batch_fn(step), group), loss_fn, is_main=rank == 0,
                   **train_kwargs)
    if train_kwargs.get("checkpoint") is not None:  # the final checkpoint exists before anyone reads it
        collective("data_parallel_train", "barrier", group, dist.barrier)
    return result
