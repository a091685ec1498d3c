"""An MoA plan: per layer and head, the elastic rule ``S_h(N) = alpha_h + beta_h * N`` and the attention sinks.

A plan is plain data (JSON on disk). At a sequence length ``N`` it gives each head its span and the per-head
pattern ``PerHead([SinkWindow(S_h(N), sinks), ...])`` that :func:`headwise.attention` runs.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from headwise.patterns.base import PerHead
from headwise.patterns.moa import SinkWindow

__all__ = ["MoAPlan", "span_at", "causal_density"]

FORMAT = "headwise.moa.plan/1"  # the "format" field of a plan's JSON


def span_at(alpha: float, beta: float, n: int) -> int:
    """The span of the rule ``(alpha, beta)`` at length ``n``: ``floor(alpha + beta * n)`` clamped to ``[1, n]``.

    Choice: MoA does not say how a fractional or out-of-range span is rounded; we floor it and always keep the
    query itself (span >= 1) and never more than the causal context (span <= n).
    """
    return int(min(max(math.floor(alpha + beta * n), 1), n))


def causal_density(pattern, n: int) -> float:
    """Attended pairs of ``pattern`` at ``n`` tokens over the ``n (n + 1) / 2`` causal pairs (MoA's density)."""
    return pattern.density(n, n) * n * n / (n * (n + 1) / 2)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class MoAPlan:
    """Elastic per-head rules for every attention layer of a model.

    Attributes:
        alphas: ``[layers][heads]`` span intercepts in tokens.
        betas: ``[layers][heads]`` span slopes (fraction of the length), usually in ``[0, 1]``.
        sinks: number of initial tokens every head attends (attention sinks), shared by all heads.
        meta: free-form provenance (budget, lengths, losses, ...), saved with the plan.

    Example:
        >>> plan = MoAPlan(alphas=[[16, 0]], betas=[[0.0, 0.5]], sinks=4)
        >>> plan.spans(0, 128)
        [16, 64]
        >>> plan.pattern(0, 128)                       # the layer-0 per-head pattern at N = 128
        PerHead([SinkWindow(span=16, sinks=4), SinkWindow(span=64, sinks=4)])
    """

    alphas: tuple[tuple[float, ...], ...]  # [layers][heads] intercepts (tokens)
    betas: tuple[tuple[float, ...], ...]  # [layers][heads] slopes
    sinks: int = 0  # attention-sink tokens shared by every head
    meta: dict = field(default_factory=dict, compare=False)  # provenance, saved as is

    def __post_init__(self):
        alphas, betas = (self._table(name, getattr(self, name)) for name in ("alphas", "betas"))
        shape = [len(row) for row in alphas]
        if shape != [len(row) for row in betas]:
            raise ValueError(f"alphas and betas must have the same [layers][heads] shape, got heads per layer "
                             f"{shape} and {[len(row) for row in betas]}")
        if len(set(shape)) != 1:
            raise ValueError(f"every layer must have the same number of heads, got heads per layer {shape}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got sinks={self.sinks!r}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got meta={self.meta!r}")
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "betas", betas)

    @staticmethod
    def _table(name, rows) -> tuple[tuple[float, ...], ...]:
        if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__") or len(rows) == 0:
            raise ValueError(f"{name} must be a non-empty [layers][heads] list of numbers, got {name}={rows!r}")
        out = []
        for layer, row in enumerate(rows):
            if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) == 0:
                raise ValueError(f"{name}[{layer}] must be a non-empty list of numbers, got {row!r}")
            for head, x in enumerate(row):
                if not _is_number(x):
                    raise ValueError(f"{name}[{layer}][{head}] must be a finite number, got {x!r}")
            out.append(tuple(float(x) for x in row))
        return tuple(out)

    @property
    def layers(self) -> int:
        return len(self.alphas)

    @property
    def heads(self) -> int:
        return len(self.alphas[0])

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise ValueError(f"layer must be an int in [0, {self.layers}), got layer={layer!r}")
        return layer

    def spans(self, layer: int, n: int) -> list[int]:
        """The span of every head of ``layer`` at length ``n`` (see :func:`span_at`)."""
        layer = self._layer(layer)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sequence length must be a positive int, got n={n!r}")
        return [span_at(a, b, n) for a, b in zip(self.alphas[layer], self.betas[layer])]

    def pattern(self, layer: int, n: int) -> PerHead:
        """``PerHead`` of :class:`~headwise.patterns.SinkWindow` for the heads of ``layer`` at length ``n``."""
        return PerHead([SinkWindow(s, self.sinks) for s in self.spans(layer, n)])

    def density(self, n: int, layer: int | None = None) -> float:
        """Mean causal density (attended / causal pairs) over the heads of ``layer`` (all layers when None)."""
        layers = range(self.layers) if layer is None else [self._layer(layer)]
        return sum(causal_density(self.pattern(i, n), n) for i in layers) / len(layers)

    # ---- JSON ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "sinks": self.sinks, "alphas": [list(r) for r in self.alphas],
                "betas": [list(r) for r in self.betas], "meta": self.meta}

    @classmethod
    def from_dict(cls, d) -> MoAPlan:
        if not isinstance(d, dict):
            raise ValueError(f"an MoA plan must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not an MoA plan: format={d.get('format')!r}, expected {FORMAT!r}")
        missing = sorted({"alphas", "betas", "sinks"} - set(d))
        if missing:
            raise ValueError(f"MoA plan misses the key(s) {missing}")
        unknown = sorted(set(d) - {"format", "alphas", "betas", "sinks", "meta"})
        if unknown:
            raise ValueError(f"MoA plan has unknown key(s) {unknown}")
        return cls(alphas=d["alphas"], betas=d["betas"], sinks=d["sinks"], meta=d.get("meta", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MoAPlan:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"MoA plan file not found: path={str(path)!r}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"MoA plan {str(path)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def uniform(cls, layers: int, heads: int, alpha: float, beta: float, sinks: int = 0) -> MoAPlan:
        """The same rule for every head (StreamingLLM is ``beta = 0``)."""
        return cls(alphas=[[alpha] * heads] * layers, betas=[[beta] * heads] * layers, sinks=sinks)
