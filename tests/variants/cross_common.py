"""Shared helpers of the tests of multiscale_heads, glca, pwca, dictionary_cross, mil_attention, shared_kv and
window_cross (the former ``cross`` family): float64 inputs with fixed seeds, every parameter gets a gradient."""

import torch

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_all_params_get_grads(module, out):
    """Every trainable parameter gets a finite, non-zero gradient from a random projection of ``out``."""
    loss = sum((o * rand(*o.shape, seed=i + 1, dtype=o.dtype)).sum() for i, o in enumerate(out))
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, _), g in zip(params.items(), grads):
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"{name} has a zero or non-finite gradient"


def mha_like(m):
    """A MultiHeadAttention holding ``m``'s q/k/v and output projection weights (same sizes, float64)."""
    from headwise.variants.mha import MultiHeadAttention

    ref = MultiHeadAttention(m.dim, m.heads, kv_heads=m.kv_heads, head_dim=m.head_dim).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items()
                         if k.split(".")[0] in ("q_proj", "k_proj", "v_proj", "out_proj")})
    return ref
