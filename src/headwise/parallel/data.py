"""Data parallelism plumbing: the DDP wrapper whose checkpoints are the wrapped module's, each rank's slice of a
batch, the process group from ``torchrun``'s environment. The arena trains with it
(:func:`headwise.arena.data_parallel_train`)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from headwise.distributed.sharding import world_and_rank

__all__ = ["DataParallel", "shard_batch", "init_from_env"]


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


