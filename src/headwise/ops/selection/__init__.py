"""Content-aware selection of the keys (blocks or tokens) each query visits, computed at run time."""

from headwise.ops.selection.blocks import (  # noqa: F401
    VMOBA_PARTITIONS, block_means, blocks_from_token_selection, hip_select, moba_select, vmoba_layer_partition,
    vmoba_partition, vmoba_select,
)
from headwise.ops.selection.tokens import (  # noqa: F401
    DMABlocks, attention_rollout, dense_token_select, dma_block_keep, dma_blocks, dma_key_rank, dma_mask, rollout_select,
    top_indices, topk_mask,
)
