"""Attention patterns: which (query, key) pairs may attend, as a predicate and an exact tile schedule."""

from headwise.patterns.base import Causal, Full, Intersection, Pattern, PerHead, TileSchedule, Union
from headwise.patterns.neighborhood import Neighborhood, blocked
from headwise.patterns.segments import KeyMask, Segments
from headwise.patterns.spec import PATTERNS, from_spec
from headwise.patterns.structured import ConvWindow, Halo, Isolation, MaxViTBlock, MaxViTGrid, Radial, RegionAttention, S2Shards
from headwise.patterns.window import SlidingWindow
from headwise.patterns.moa import SinkWindow  # MoA / StreamingLLM causal window with attention sinks
from headwise.patterns.moa_plan import MoAPlan  # MoA's per-layer, per-head elastic windows (JSON)

__all__ = ["Pattern", "TileSchedule", "Full", "Causal", "Union", "Intersection", "PerHead",
           "Neighborhood", "blocked", "SlidingWindow", "Segments", "KeyMask", "PATTERNS", "from_spec",
           "MaxViTBlock", "MaxViTGrid", "Halo", "ConvWindow", "Radial", "S2Shards", "RegionAttention", "Isolation"]
__all__ += ["SinkWindow", "MoAPlan"]
