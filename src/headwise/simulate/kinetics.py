"""Decoding cost of dense vs sparse attention: the cost model of Kinetics (Sadhukhan et al., "Kinetics: Rethinking
Test-Time Scaling Laws", 2025, arXiv:2506.05333).

Kinetics prices a generated token by its compute plus its memory traffic, converted to *equivalent FLOPs* with the
hardware's arithmetic intensity ``I`` (peak FLOP/s over memory bandwidth), because in long decoding the KV-cache
reads, not the parameter FLOPs, dominate:

    eFLOPs = C_comp + I * C_mem

Model: ``P`` active parameters, ``L`` layers, ``H`` query heads, ``H_kv`` KV heads (GQA ratio ``r = H / H_kv``),
head dim ``d``; KV cache size per token ``D = 2 L H_kv d`` elements (K and V), ``e`` bytes per element.
One decoding step of a batch of ``B`` sequences, each attending a context of ``S`` cached tokens:

    linear FLOPs     = 2 P B                            (every weight: one multiply-add per sequence)
    attention FLOPs  = 2 r D S B = 4 L H d S B          (q . k and p * v: 2 d each per key, per query head)
    KV bytes         = D S B e                          (the whole cache of every sequence is read once)
    weights bytes    = P e                              (read once per step, shared by the batch)

Sparse attention keeps ``k`` of the ``S`` tokens per (sequence, layer, KV head): ``k = ceil(density * S)`` or a
given top-k budget; attention FLOPs and KV bytes then use ``k`` for ``S``. Two variants:

* oracle top-k (``block=None``): the ``k`` tokens are given; selecting them is not counted (Kinetics' oracle
  top-k analysis).
* block top-k (``block=b``): keys are grouped in blocks of ``b`` tokens, each summarized by one representative
  (mean) key; the query scores all ``ceil(S / b)`` representatives and keeps ``ceil(k / b)`` whole blocks, so
  ``k`` is rounded up to whole blocks (at most ``S``) and selection adds ``2 r (D / 2) ceil(S / b) B`` FLOPs and
  ``(D / 2) ceil(S / b) B e`` bytes (keys only). Choice: Kinetics uses block top-k for its sparse scaling law; how
  its representative keys are stored and read is our modelling assumption, stated here.

``eFLOPs = linear + attention (+ selection) FLOPs + I * (KV (+ selection) bytes)``: like the paper's Eq. (the
linear, self-attention and KV-access terms), parameter traffic is left out of eFLOPs (amortized over the batch);
it is reported separately as ``weights_bytes``. Per generated token = per step / ``B``. ``I`` is in FLOPs per
byte; the default 281.25 is an NVIDIA B200 (2.25 PFLOP/s dense BF16, 8 TB/s), the paper's 562.5 FLOPs per BF16
element.

Use :func:`decode_cost` from code, ``headwise simulate decode --params ...`` from the shell.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ModelShape", "AttentionCost", "DecodeCost", "decode_cost", "B200_FLOPS_PER_BYTE"]

B200_FLOPS_PER_BYTE = 2.25e15 / 8e12  # 281.25: dense BF16 FLOP/s over HBM bandwidth


def _positive_int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    return int(value)


@dataclass(frozen=True)
class ModelShape:
    """The model sizes the cost model needs."""

    params: float  # P: active parameters (all of them for a dense model)
    layers: int  # L: transformer layers with attention
    heads: int  # H: query heads per layer
    kv_heads: int  # H_kv: key/value heads per layer (GQA); == heads for MHA
    head_dim: int  # d

    def __post_init__(self):
        if not isinstance(self.params, numbers.Real) or isinstance(self.params, bool) or not self.params > 0:
            raise ValueError(f"params must be a positive number, got params={self.params!r}")
        for name in ("layers", "heads", "kv_heads", "head_dim"):
            _positive_int(name, getattr(self, name))
        if self.heads % self.kv_heads:
            raise ValueError(f"heads must be a multiple of kv_heads, got heads={self.heads} kv_heads={self.kv_heads}")

    @property
    def gqa_ratio(self) -> int:
        """r = H / H_kv."""
        return self.heads // self.kv_heads

    @property
    def kv_per_token(self) -> int:
        """D = 2 L H_kv d: cached elements per token (K and V, all layers)."""
        return 2 * self.layers * self.kv_heads * self.head_dim


@dataclass(frozen=True)
class AttentionCost:
    """One decoding step of the whole batch, and per generated token (``*_per_token``), for one attention kind."""

    kind: str  # "dense", "top-k" or "block top-k"
    attended: int  # tokens each query reads per (layer, KV head): S, or the sparse budget
    linear_flops: float
    attention_flops: float
    selection_flops: float  # block top-k: scoring the block representatives
    kv_bytes: float
    selection_bytes: float
    weights_bytes: float  # not in eflops (see the module docstring)
    eflops: float
    eflops_per_token: float
    attention_share: float  # (attention + selection FLOPs + I * bytes) / eFLOPs: the attention part of the cost


@dataclass(frozen=True)
class DecodeCost:
    """Dense vs sparse decoding cost and their ratios."""

    model: ModelShape
    context: int  # S
    batch: int  # B
    bytes_per_element: float  # e
    flops_per_byte: float  # I
    dense: AttentionCost
    sparse: AttentionCost | None
    attention_flops_ratio: float | None  # dense / sparse attention (+ selection) FLOPs
    kv_bytes_ratio: float | None  # dense / sparse memory traffic (KV + selection)
    eflops_speedup: float | None  # dense / sparse eFLOPs per token

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cost(kind: str, m: ModelShape, attended: int, batch: int, e: float, intensity: float,
          sel_keys: int = 0) -> AttentionCost:
    linear = 2.0 * m.params * batch
    attention = 2.0 * m.gqa_ratio * m.kv_per_token * attended * batch
    kv = float(m.kv_per_token) * attended * batch * e
    sel_flops = 2.0 * m.gqa_ratio * (m.kv_per_token / 2) * sel_keys * batch
    sel_bytes = (m.kv_per_token / 2) * sel_keys * batch * e
    eflops = linear + attention + sel_flops + intensity * (kv + sel_bytes)
    return AttentionCost(
        kind=kind, attended=attended, linear_flops=linear, attention_flops=attention, selection_flops=sel_flops,
        kv_bytes=kv, selection_bytes=sel_bytes, weights_bytes=m.params * e, eflops=eflops,
        eflops_per_token=eflops / batch, attention_share=(eflops - linear) / eflops,
    )


def decode_cost(
    model: ModelShape,
    *,
    context: int,
    batch: int = 1,
    density: float | None = None,
    topk: int | None = None,
    block: int | None = None,
    bytes_per_element: float = 2.0,
    flops_per_byte: float = B200_FLOPS_PER_BYTE,
) -> DecodeCost:
    """Per-step and per-token cost of decoding with dense attention and, given ``density`` or ``topk``, sparse
    attention (oracle top-k, or block top-k with ``block`` tokens per block). Equations: module docstring.

    >>> m = ModelShape(params=8e9, layers=36, heads=32, kv_heads=8, head_dim=128)
    >>> c = decode_cost(m, context=32768, batch=1, density=1 / 16)
    >>> round(c.kv_bytes_ratio), round(c.dense.attention_share, 2)
    (16, 0.99)
    """
    if not isinstance(model, ModelShape):
        raise TypeError(f"model must be a ModelShape, got {type(model).__name__}")
    context = _positive_int("context", context)
    batch = _positive_int("batch", batch)
    if not bytes_per_element > 0:
        raise ValueError(f"bytes_per_element must be positive, got {bytes_per_element=}")
    if not flops_per_byte >= 0:
        raise ValueError(f"flops_per_byte must be >= 0, got {flops_per_byte=}")
    if density is not None and topk is not None:
        raise ValueError(f"give density or topk, not both: {density=} {topk=}")
    if block is not None:
        block = _positive_int("block", block)
        if density is None and topk is None:
            raise ValueError(f"{block=} needs a sparse budget: give density or topk")
    dense = _cost("dense", model, context, batch, bytes_per_element, flops_per_byte)
    sparse = None
    if density is not None or topk is not None:
        if density is not None:
            if not isinstance(density, numbers.Real) or not 0 < density <= 1:
                raise ValueError(f"density must be in (0, 1], got {density=!r}")
            k = math.ceil(density * context)
        else:
            k = min(_positive_int("topk", topk), context)
        if block is None:
            sparse = _cost("top-k", model, k, batch, bytes_per_element, flops_per_byte)
        else:
            k = min(math.ceil(k / block) * block, context)
            sparse = _cost("block top-k", model, k, batch, bytes_per_element, flops_per_byte,
                           sel_keys=math.ceil(context / block))
    return DecodeCost(
        model=model, context=context, batch=batch, bytes_per_element=bytes_per_element,
        flops_per_byte=flops_per_byte, dense=dense, sparse=sparse,
        attention_flops_ratio=None if sparse is None else
        dense.attention_flops / (sparse.attention_flops + sparse.selection_flops),
        kv_bytes_ratio=None if sparse is None else dense.kv_bytes / (sparse.kv_bytes + sparse.selection_bytes),
        eflops_speedup=None if sparse is None else dense.eflops_per_token / sparse.eflops_per_token,
    )
