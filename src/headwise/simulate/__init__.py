"""The simulator: how much a sparse pattern can speed attention up, before anything is timed.

* :mod:`headwise.simulate.tiles`: exact attended pairs, dense / pattern / tile-level FLOPs and the tiles a tiled
  kernel visits (row-major tiles vs the pattern's token-permuted schedule), hence the upper-bound speedup
  (the analytical side of Generalized Neighborhood Attention).
* :mod:`headwise.simulate.kinetics`: the decoding cost model of Kinetics (compute + KV-cache traffic per generated
  token, dense vs top-k / block top-k sparse attention).
* :mod:`headwise.simulate.report`: tables, JSON, the upper-bound vs measured plot, ``headwise simulate``.
"""

from headwise.simulate.kinetics import AttentionCost, DecodeCost, ModelShape, decode_cost
from headwise.simulate.tiles import PatternSimulation, ScheduleStats, simulate_pattern

__all__ = ["simulate_pattern", "PatternSimulation", "ScheduleStats", "decode_cost", "ModelShape", "DecodeCost",
           "AttentionCost"]
