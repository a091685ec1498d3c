"""MoBA, Mixture of Block Attention (registered as ``"moba"``).

Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs": per-query top-k key blocks by
``q . mean(block keys)``, own block always in, causal. The functional core is :mod:`headwise.ops.moba` (fast path
on the selected-blocks engine, reference in ``naive.py``); this module owns the projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from headwise.checks import check_bool, check_positive_int
from headwise.core.selected import BACKENDS as SELECTED_BACKENDS
from headwise.ops.moba import moba_attention
from headwise.variants.base import Capabilities, ProjectedAttention, check_backend
from headwise.variants.registry import register

__all__ = ["MoBAAttention"]


@register("moba")
class MoBAAttention(ProjectedAttention):
    r"""MoBA, Mixture of Block Attention (Lu et al., 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs").

    The keys are split into blocks of ``block`` tokens; block ``c`` is represented by its mean key
    :math:`\bar k_c`. For query ``i`` (per head) the gate is :math:`s_{ic} = q_i \cdot \bar k_c`; the query attends
    to its own block ``i // block`` (always, counted in the ``topk``) and the ``topk - 1`` earlier blocks with the
    highest gates (causal: later blocks are excluded; inside the own block the token-level causal mask applies):

    .. math::

        o_i = \mathrm{softmax}\big(q_i K_{\mathcal S_i}^\top / \sqrt{D}\big) V_{\mathcal S_i},\qquad
        \mathcal S_i = \{\text{tokens } j \le i \text{ of the selected blocks}\}

    ``topk >= ceil(N / block)`` is full causal attention. Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; heads
    ``[B, H, N, D]``. Defaults ``block=512, topk=3`` (the paper's block size and top-k of its scaling experiments).

    Choices made here: the gates are not differentiated (the paper's gate has no parameters: the model learns
    through the attention over the chosen blocks); ties rank the lower block first; a shorter last block is
    represented by the mean of its tokens; ``causal=False`` (own block + best ``topk - 1`` others, no token mask)
    is an extension. No key padding mask, no cross-attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("moba(block=64, topk=3)", dim=256, heads=8)
        >>> m(torch.randn(2, 1000, 256)).shape
        torch.Size([2, 1000, 256])
    """

    capabilities = Capabilities(causal="optional", weights="method")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "block": 3, "topk": 2}

    @dataclass
    class Config(ProjectedAttention.Config):
        backend: str = "auto"  # selected-blocks engine backend: "auto", "reference", "blocksparse"
        block: int = 512  # key (and query) block size in tokens
        topk: int = 3  # blocks each query visits, its own block included
        causal: bool = True  # causal attention: only earlier blocks compete, token-level mask in the own block

        def __post_init__(self):
            super().__post_init__()
            check_backend(self.backend, SELECTED_BACKENDS)
            check_positive_int("block", self.block)
            check_positive_int("topk", self.topk)
            check_bool("causal", self.causal)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.moba.moba_attention` with this module's settings."""
        c = self.config
        return moba_attention(q, k, v, block=c.block, topk=c.topk, causal=c.causal, backend=c.backend)
