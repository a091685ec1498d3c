"""Context parallelism on ``torch.distributed``: ring attention, head-parallel attention, sequence sharding.

Each of P processes launched by ``torchrun`` runs (not run as a doctest: it needs the process group)::

    import torch.distributed as dist, headwise.distributed as hd
    dist.init_process_group("gloo")                                          # "nccl" on GPUs
    qs, ks, vs = (hd.shard_sequence(t) for t in (q, k, v))                  # [B, H, N, D] -> [B, H, n, D]
    out = hd.ring_attention(qs, ks, vs, headwise.patterns.Causal(), seq_len=q.shape[2])
    full = hd.gather_sequence(out, seq_len=q.shape[2])                       # equals headwise.attention(q, k, v, Causal())

Also: :func:`head_parallel_attention` (all-to-all; heads divisible by ranks), :func:`count_communication`,
:func:`run_local` (P local gloo processes, for tests and ``headwise bench distributed``). Launch with ``torchrun``
(README: multi-node, NCCL on GPUs). These are operations on heads; running modules over process groups is
:mod:`headwise.parallel` (``ContextParallel``, DDP plumbing) and the arena (``data_parallel_train``).
"""

from headwise.distributed.head_parallel import head_parallel_attention
from headwise.distributed.launch import run_local
from headwise.distributed.ring import ring_attention
from headwise.distributed.sharding import (LAYOUTS, CommCounter, ShardLayout, count_communication, gather_sequence,
                                           shard_sequence)

__all__ = ["ring_attention", "head_parallel_attention", "shard_sequence", "gather_sequence", "ShardLayout", "LAYOUTS",
           "count_communication", "CommCounter", "run_local"]
