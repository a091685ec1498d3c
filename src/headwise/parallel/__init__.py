"""Running headwise modules over process groups (a tool over modules, above :mod:`headwise.variants`).

* :class:`ContextParallel`: a softmax attention module (``capabilities.softmax``: ``mha``, ``gqa``, ``mqa``,
  ``moa``) on this rank's shard of the sequence, its attention step by ring or head-parallel attention
  (:mod:`headwise.distributed`, the operations).
* :class:`DataParallel`, :func:`shard_batch`, :func:`init_from_env`: DDP plumbing for ``torchrun``; the arena's
  data-parallel training is :func:`headwise.arena.data_parallel_train`.
"""

from headwise.parallel.context import METHODS, ContextParallel, supports
from headwise.parallel.data import DataParallel, init_from_env, shard_batch

__all__ = ["ContextParallel", "METHODS", "supports", "DataParallel", "init_from_env", "shard_batch"]
