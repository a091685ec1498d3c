"""Attention patterns: which (query, key) pairs may attend, as a predicate and an exact tile schedule."""

from headwise.patterns.base import Causal, Full, Intersection, Pattern, PerHead, TileSchedule, Union

__all__ = ["Pattern", "TileSchedule", "Full", "Causal", "Union", "Intersection", "PerHead"]
