"""VMoBA, Mixture-of-Block Attention for video diffusion (registered as ``"vmoba"``).

Wu et al., 2025, "VMoBA: Mixture-of-Block Attention for Video Diffusion Models": 1-D / 2-D / 3-D block
partitions of a video grid cycling over layers, global (per-head) and threshold block selection, non-causal. The
functional core is :mod:`headwise.ops.moba` (``vmoba_attention``, reference in ``naive.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from headwise.checks import check_positive_int
from headwise.core.selected import BACKENDS as SELECTED_BACKENDS
from headwise.ops.moba import vmoba_attention
from headwise.ops.selection.blocks import VMOBA_PARTITIONS, vmoba_layer_partition, vmoba_partition
from headwise.variants.base import Capabilities, ProjectedAttention, check_backend
from headwise.variants.registry import register

__all__ = ["VMoBAAttention"]


@register("vmoba")
class VMoBAAttention(ProjectedAttention):
    r"""VMoBA, Mixture-of-Block Attention for video diffusion (Wu et al., 2025, "VMoBA: Mixture-of-Block Attention
    for Video Diffusion Models"), non-causal.

    MoBA's gates :math:`g_{ic} = q_i \cdot \bar k_c` over blocks of a ``(T, H, W)`` video grid, with the paper's
    three changes:

    1. layer-wise recurrent partition: layer ``l`` partitions the grid ``("1d", "2d", "3d")[l % 3]``:
       ``block_1d`` frames, ``block_2d = (bh, bw)`` patches through all frames, ``block_3d = (bt, bh, bw)`` cubes
       (:func:`~headwise.ops.selection.vmoba_partition`); ``partition`` overrides the cycle;
    2. global block selection (``scope="head"``): all (query, block) pairs of a head compete together
       (``scope="query"``: per query, as in MoBA);
    3. threshold selection (``selection="threshold"``): the smallest set of pairs, own blocks first, whose
       min-max normalised gate mass reaches ``tau`` of the scope's total, with at least one pair beyond the own
       blocks (exact definition: :func:`~headwise.ops.selection.vmoba_select`); or ``selection="topk"``.

    Every query also attends to its own block. Shapes: ``x`` ``[B, N, C]`` with ``N = T H W`` (row-major) ->
    ``[B, N, C]``. ``tau=1`` selects every block: full attention.

    Choices made here: the threshold rule follows the authors' code (min-max normalisation, ``eps = 1e-6``)
    since the paper states it in words; ``tau=0.25`` is that code's default; the default block shapes (1 frame,
    8 x 8, 4 x 8 x 8) are headwise's (the paper sizes them per model). Selection not differentiated; no key
    padding mask, no cross-attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("vmoba(grid=(4, 16, 16), layer=1)", dim=128, heads=4)   # layer 1: 2-D blocks
        >>> m(torch.randn(1, 1024, 128)).shape
        torch.Size([1, 1024, 128])
    """

    capabilities = Capabilities(grid="required", weights="method")
    example_config = {"dim": 16, "heads": 2, "grid": (2, 3, 4), "block_2d": (3, 2), "block_3d": (2, 3, 2)}

    @dataclass
    class Config(ProjectedAttention.Config):
        backend: str = "auto"  # selected-blocks engine backend: "auto", "reference", "blocksparse"
        grid: tuple[int, int, int] | None = None  # the video's (T, H, W) token grid, required
        layer: int = 0  # layer index: partition ("1d", "2d", "3d")[layer % 3]
        partition: str | None = None  # "1d", "2d" or "3d" overriding the layer cycle; None: from layer
        block_1d: int = 1  # frames per 1-D block
        block_2d: tuple[int, int] = (8, 8)  # (bh, bw) of a 2-D block (through all frames)
        block_3d: tuple[int, int, int] = (4, 8, 8)  # (bt, bh, bw) of a 3-D block
        selection: str = "threshold"  # "threshold" (gate mass reaches tau) or "topk"
        scope: str = "head"  # "head" (global selection over the head's (query, block) pairs) or "query"
        tau: float = 0.25  # threshold on the normalised gate mass, in [0, 1]
        topk: int = 3  # blocks per query (scope "head": topk * N pairs per head), own block included

        def __post_init__(self):
            super().__post_init__()
            check_backend(self.backend, SELECTED_BACKENDS)
            if self.grid is None:
                raise ValueError("vmoba needs grid=(T, H, W), the video's token grid")
            self.grid = tuple(self.grid) if isinstance(self.grid, list) else self.grid
            self.block_2d, self.block_3d = tuple(self.block_2d), tuple(self.block_3d)
            cycle = vmoba_layer_partition(self.layer)  # checks layer >= 0
            if self.partition is None:
                self.partition = cycle
            elif self.partition not in VMOBA_PARTITIONS:
                raise ValueError(f"unknown partition={self.partition!r}; valid: None, "
                                 + ", ".join(map(repr, VMOBA_PARTITIONS)))
            vmoba_partition(self.grid, self.partition, self.block)  # checks the grid and the block shape
            if self.selection not in ("threshold", "topk"):
                raise ValueError(f"unknown selection={self.selection!r}; valid: 'threshold', 'topk'")
            if self.scope not in ("head", "query"):
                raise ValueError(f"unknown scope={self.scope!r}; valid: 'head', 'query'")
            if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
                raise ValueError(f"tau must be a number in [0, 1], got tau={self.tau!r}")
            check_positive_int("topk", self.topk)

        @property
        def block(self):
            """The block shape of the chosen partition."""
            return {"1d": self.block_1d, "2d": self.block_2d, "3d": self.block_3d}[self.partition]

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """:func:`headwise.ops.moba.vmoba_attention` with this module's settings."""
        c = self.config
        return vmoba_attention(q, k, v, grid=c.grid, partition=c.partition, block=c.block, selection=c.selection,
                               scope=c.scope, tau=c.tau, topk=c.topk, backend=c.backend)
