"""HiP, hierarchically pruned attention (registered as ``"hip"``).

Lee et al., 2024, "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning":
training-free tree search for the top-k key blocks of each query block, plus a sliding window. The functional core
is :mod:`headwise.ops.hip` (fast path on the selected-blocks engine, reference in ``naive.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from headwise.checks import check_bool, check_positive_int
from headwise.core.selected import BACKENDS as SELECTED_BACKENDS
from headwise.ops.hip import hip_attention
from headwise.variants.base import Capabilities, ProjectedAttention, check_backend
from headwise.variants.registry import register

__all__ = ["HiPAttention"]


@register("hip")
class HiPAttention(ProjectedAttention):
    r"""HiP, hierarchically pruned attention (Lee et al., 2024, "HiP Attention: Sparse Sub-Quadratic Attention with
    Hierarchical Attention Pruning"): training-free, ``O(N log N)``.

    Per query block of ``block`` queries, a tree search over the key blocks outside the sliding window: start from
    ``topk`` equal groups of blocks; repeatedly halve every group, score each half by its centre key
    (:math:`\max_{i \in \text{block}} q_i \cdot k_{centre}`) and keep the ``topk`` best halves, until every group is a
    single key block (:func:`~headwise.ops.selection.hip_select`). The query block then attends to those ``topk``
    blocks and its ``window`` most recent blocks (its own included), with the token-level causal mask:

    .. math:: o_i = \mathrm{softmax}\big(q_i K_{\mathcal S_b}^\top / \sqrt{D}\big) V_{\mathcal S_b},\quad
              \mathcal S_b = \{j \le i: j // \mathrm{block} \in \mathrm{window}(b) \cup \mathrm{found}(b)\}

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; heads ``[B, H, N, D]``. With ``topk + window >= ceil(N / block)``
    it is full causal attention.

    Choices made here (from the paper's algorithm; its code was not used): the paper prunes to single tokens
    inside small key blocks and a query block shares one mask; we search at the granularity of ``block``-token key
    blocks (the engine's tiles), with ``block=64, topk=8`` (512 keys, the paper's ``k``) and a 2-block window as
    defaults; groups split as ``[lo, lo + ceil(size / 2))``; ties keep the lower position. ``causal=False``
    (window centred on the block) is an extension. Selection not differentiated; no key padding mask.

    Causality: keys after a query are always masked, but a query block's selection is scored with the max over
    *all* its queries (as the paper's blocked prefill does), so with ``block > 1`` an output can depend on later
    queries of its own block through which key blocks were found. That is harmless for training-free prefill
    (the paper's use) but a leak for autoregressive training: the arena refuses ``hip`` on language tasks
    whenever pruning happens, e.g. ``hip(block=8, topk=2, window=1)`` at N = 64 (:meth:`causal_leak`).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("hip(block=32, topk=4)", dim=256, heads=8)
        >>> m(torch.randn(2, 1000, 256)).shape
        torch.Size([2, 1000, 256])
    """

    capabilities = Capabilities(causal="optional", weights="method")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "block": 1, "topk": 2, "window": 2}  # block 1: strictly causal

    @dataclass
    class Config(ProjectedAttention.Config):
        backend: str = "auto"  # selected-blocks engine backend: "auto", "reference", "blocksparse"
        block: int = 64  # query and key block size in tokens
        topk: int = 8  # key blocks the tree search keeps per query block
        window: int = 2  # sliding-window key blocks per query block (the own block and window - 1 before it)
        causal: bool = True  # causal attention (the paper's LLM setting)

        def __post_init__(self):
            super().__post_init__()
            check_backend(self.backend, SELECTED_BACKENDS)
            check_positive_int("block", self.block)
            check_positive_int("topk", self.topk)
            check_positive_int("window", self.window)
            check_bool("causal", self.causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.hip.hip_attention` with this module's settings."""
        c = self.config
        return hip_attention(q, k, v, block=c.block, topk=c.topk, window=c.window, causal=c.causal, backend=c.backend)

    def causal_leak(self, seq_len: int) -> str | None:
        """With ``block > 1`` and pruning at ``seq_len`` (``topk + window < ceil(seq_len / block)``) a query
        block's selection is scored with all its queries, so an output can depend on later queries of its block."""
        c = self.config
        if c.causal and c.block > 1 and c.topk + c.window < math.ceil(seq_len / c.block):
            return (f"hip's blocked selection (block={c.block}) scores a query block with all its queries, so at "
                    f"{seq_len} tokens (topk + window = {c.topk + c.window} < {math.ceil(seq_len / c.block)} blocks) "
                    f"an output depends on later tokens of its block")
        return None
