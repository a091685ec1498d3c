"""Attention modules by family; importing this package registers them."""

from headwise.variants.registry import available, create, get, register
from headwise.variants import softmax  # noqa: F401  (registers mha, gqa, mqa)
from headwise.variants import heads  # noqa: F401  (registers moh, relu_moh, single_head, cascaded_group)
from headwise.variants import gaussian  # noqa: F401  (registers gaam, gaam_attention)
from headwise.variants import experts  # noqa: F401  (registers attention_experts, selective)
from headwise.variants import positional  # noqa: F401  (registers complex, rcmha)
from headwise.variants import random_features  # noqa: F401  (registers random_features)
from headwise.variants import linear  # noqa: F401  (registers lightning, linear, agent)
from headwise.variants import structured  # noqa: F401  (registers max_vit, halo, msa_conv)
from headwise.variants import vision  # noqa: F401  (registers lka, ulsam, spectral, nin_gate, multihead_scan)
from headwise.variants import cross  # noqa: F401  (registers multiscale_heads, glca, pwca, dictionary_cross, mil_attention, shared_kv, window_cross)
from headwise.variants import sets  # noqa: F401  (registers set_attention, memory_attention)
from headwise.variants import dynamic  # noqa: F401  (registers topk, dma, sparsifiner)
from headwise.variants import moa  # noqa: F401  (registers moa)
from headwise.variants import semantic  # noqa: F401  (registers class_semantic)
from headwise.variants import mixture_of_blocks  # noqa: F401  (registers moba, vmoba, hip)

__all__ = ["available", "create", "get", "register"]
