"""Shared helpers of the mixer tests (lka, ulsam, spectral, nin_gate, multihead_scan, class_semantic,
set_attention, memory_attention)."""

import torch

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_all_params_get_grads(module, out):
    """Every trainable parameter gets a finite, non-zero gradient from a random projection of ``out``."""
    loss = (out * rand(*out.shape, seed=1, dtype=out.dtype)).sum()
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, _), g in zip(params.items(), grads):
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all(), f"{name} has a non-finite gradient"
        assert g.abs().max() > 0, f"{name} has an all-zero gradient"
