"""Shared checks of the head-level variants (moh, relu_moh, single_head, cascaded_group)."""

import torch

import headwise

F64 = torch.float64


def grads(out, wrt, seed=0):
    """Gradients of a fixed random projection of ``out`` (no symmetric cancellation)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), wrt, allow_unused=True)


def assert_same_grads(out, ref, wrt, tol=1e-10):
    for a, b in zip(grads(out, wrt), grads(ref, wrt)):
        if a is None or b is None:
            assert a is None and b is None or (a if a is not None else b).abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def check_shape_and_dtype(spec, kw, N, dtype):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=64, **kw).to(dtype)
    y = m(torch.randn(2, N, 64, dtype=dtype))
    assert y.shape == (2, N, 64) and y.dtype == dtype and torch.isfinite(y).all()


def check_gradients_reach_every_parameter(spec, kw, N):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=64, **kw)
    x = torch.randn(2, N, 64, requires_grad=True)
    loss = m(x).square().sum()
    if hasattr(m, "aux_loss"):
        loss = loss + m.aux_loss
    loss.backward()
    for pname, p in [("x", x), *m.named_parameters()]:
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def check_deterministic_under_seed(spec, kw, N):
    x = torch.randn(2, N, 64, generator=torch.Generator().manual_seed(3))
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        m = headwise.create(spec, dim=64, **kw).eval()
        outs += [m(x), m(x)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
