"""Per-token weighted sums of attention heads (the step of MoH and ReLU-routed MoH): the gather path, which
computes a head only for the tokens that use it (:mod:`~headwise.ops.head_mixture.gather`), and the dense
reference, which computes every head for every token and masks (:mod:`~headwise.ops.head_mixture.naive`).
:class:`Restricted` keeps a pattern exact on a call that holds only some query rows or heads."""

from headwise.ops.head_mixture.gather import gather_head_mixture
from headwise.ops.head_mixture.naive import check_mixture, dense_head_mixture
from headwise.ops.head_mixture.restrict import Restricted, restrict

__all__ = ["gather_head_mixture", "dense_head_mixture", "check_mixture", "Restricted", "restrict"]
