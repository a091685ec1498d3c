"""See what every head does: capture, per-head metrics, pattern clustering, interventions, and a report.

* :mod:`~headwise.analysis.capture`: ``with capture(model) as rec`` records attention probabilities and head
  outputs of any model built from headwise modules (observer hook in :func:`headwise.attention`), of
  :class:`torch.nn.MultiheadAttention` and of variants that compute their own (``capabilities.weights="method"``).
* :mod:`~headwise.analysis.metrics`: entropy, attention distance and spatial profile, special-token attention,
  sinks, pruning / gradient importance, GAAM Importance Factor, head divergence, rollout, flow, KQ/OV circuits.
* :mod:`~headwise.analysis.clustering`: heads grouped by their attention maps (PCA + k-means).
* :mod:`~headwise.analysis.interventions`: mask, prune, scale heads; hard-concrete head masks to a budget;
  attention edits (VAR sink redistribution, token emphasis with head modulation).
* :mod:`~headwise.analysis.report` (+ ``plots``, ``schema``, ``subjects``, ``command``): ``headwise inspect``.

>>> import torch, headwise
>>> from headwise.analysis import capture, metrics
>>> m = headwise.create("mha(pattern='causal')", dim=32, heads=4)
>>> with capture(m) as rec:
...     y = m(torch.randn(2, 10, 32))
>>> metrics.entropy(rec.records[0].probs).shape                # one value per head
torch.Size([4])
"""

from headwise.analysis import clustering, interventions, metrics
from headwise.analysis.capture import AttentionRecord, Recorder, attention_probs, capture
from headwise.analysis.interventions import (HardConcreteHeadMask, edit_attention, mask_heads, prune_heads,
                                             scale_heads)
from headwise.analysis.report import Subject, inspect_model

__all__ = [
    "capture", "Recorder", "AttentionRecord", "attention_probs", "metrics", "clustering", "interventions",
    "scale_heads", "mask_heads", "prune_heads", "HardConcreteHeadMask", "edit_attention", "Subject", "inspect_model",
]
