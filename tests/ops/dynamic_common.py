"""Shared helpers of the token-selection op tests (``ops/topk``, ``ops/dma``) and their variants: seeded float64
inputs and a forward + gradient comparison."""

import torch

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def rand(*shape, seed=0, dtype=F64, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def qkvz(N, M=None, *, H=4, H_kv=2, D=8, Dv=6, seed=0, dtype=F64, tied_z=True):
    """q ``[2, H, N, D]``, k ``[2, H_kv, M, D]``, v ``[2, H_kv, M, Dv]`` and a per-key bias z ``[2, H_kv, M]``
    (rounded when ``tied_z``: few distinct values, so the tie rule decides the selection), all requiring grad."""
    M = N if M is None else M
    q, k, v = rand(2, H, N, D, seed=seed, dtype=dtype), rand(2, H_kv, M, D, seed=seed + 1, dtype=dtype), \
        rand(2, H_kv, M, Dv, seed=seed + 2, dtype=dtype)
    z = rand(2, H_kv, M, seed=seed + 3, dtype=dtype)
    if tied_z:
        z = z.round()  # few distinct values: the tie rule decides the selection
    return [t.requires_grad_() for t in (q, k, v, z)]


def assert_same_fwd_bwd(fast, ref, inputs, tol=TOL):
    torch.testing.assert_close(fast, ref, **tol)
    g = rand(*fast.shape, seed=99, dtype=fast.dtype)
    gf = torch.autograd.grad(fast, inputs, g)
    gr = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip("qkvz", gf, gr):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {name}: {m}")


def assert_all_params_get_grads(module, out):
    loss = (out * rand(*out.shape, seed=11, dtype=out.dtype)).sum()
    params = dict(module.named_parameters())
    for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, f"{name}: no gradient"
