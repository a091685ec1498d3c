"""``ContextParallel``: run a softmax attention module on a sequence sharded over ranks.

A tool over modules: it reads the module's declared capabilities (``capabilities.softmax``: its attention step is
:func:`headwise.attention` with ``attention_pattern(N, N)`` between per-token projections) and runs that step with
the ring or head-parallel operations of :mod:`headwise.distributed` on global positions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from headwise.distributed.head_parallel import head_parallel_attention
from headwise.distributed.ring import ring_attention
from headwise.distributed.sharding import LAYOUTS, collective, world_and_rank
from headwise.variants.base import Variant

__all__ = ["ContextParallel", "METHODS", "supports"]

METHODS = {"ring": ring_attention, "heads": head_parallel_attention}


def supports(module: nn.Module) -> bool:
    """True for the headwise variants that declare a softmax attention step (``capabilities.softmax``: ``mha``,
    ``gqa``, ``mqa``, ``moa``): per-token projections, :func:`headwise.attention` with the module's
    ``attention_pattern``, the output projection."""
    return isinstance(module, Variant) and module.caps.softmax


class ContextParallel(nn.Module):
    """Wrap a softmax attention module so that it runs on this rank's shard of the sequence.

    ``ContextParallel(m)(shard_sequence(x, dim=1))`` on every rank of the group equals
    ``shard_sequence(m(x), dim=1)``: the per-token projections run on the shard, the attention runs context-
    parallel (``method="ring"``: :func:`~headwise.distributed.ring_attention`, any pattern; ``"heads"``:
    :func:`~headwise.distributed.head_parallel_attention`, heads divisible by the ranks) with the module's own
    pattern on global positions, then the output projection and dropout run on the shard.

    Supported modules: see :func:`supports` (``mha``, ``gqa``, ``mqa``, ``moa``); others raise ``TypeError`` (their
    forward does more than project-attend-project, e.g. positional terms that need global positions). Not supported:
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
            raise TypeError(f"ContextParallel supports variants with a softmax attention step (mha, gqa, mqa, moa: "
                            f"capabilities.softmax), got {type(module).__name__}")
        if method not in METHODS:
            raise ValueError(f"unknown {method=}; valid: {', '.join(map(repr, METHODS))}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown {layout=}; valid: {', '.join(map(repr, LAYOUTS))}")
        self.module, self.group, self.method, self.layout = module, group, method, layout

    def forward(self, x: Tensor, *, seq_len: int | None = None) -> Tensor:
        """``x`` ``[B, n, C]``: this rank's shard; ``seq_len``: the real length ``N`` (when padded)."""
        m = self.module
        q, k, v = m.project(x)  # (B, H, n, D), 2 x (B, H_kv, n, D)
        world, _ = world_and_rank(self.group)
        N = seq_len if seq_len is not None else x.shape[1] * world  # the global length
        kw = dict(seq_len=seq_len, layout=self.layout)
        if self.method == "heads":
            kw["backend"] = m.backend
        out = METHODS[self.method](q, k, v, m.attention_pattern(N, N), self.group, **kw)  # (B, H, n, D)
        return m.finish(out)  # (B, n, C)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        """Sum every parameter's gradient over the group (the gradient of the whole sequence's loss)."""
        world_and_rank(self.group)
        for p in self.module.parameters():
            if p.grad is not None:
                collective("ContextParallel.sync_gradients", "all_reduce", self.group, dist.all_reduce, p.grad)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, layout={self.layout!r}"


