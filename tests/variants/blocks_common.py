"""Shared checks of the block-selection variants (moba, vmoba, hip)."""

import pytest
import torch

import headwise

TOL = dict(rtol=1e-10, atol=1e-10)


def _module(spec, dim=16, heads=2, **kw):
    torch.manual_seed(0)
    return headwise.create(spec, dim=dim, heads=heads, **kw).double()


def _tokens(B, N, C, seed=1):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grads(m, x, fn):
    x = x.clone().requires_grad_()
    m.zero_grad()
    out = fn(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def check_module_against_reference(m, x, naive, **kwargs):
    """The module's output and gradients (input and every parameter) equal projections + ``naive`` + output
    projection, in float64."""
    def reference(t):
        q, k, v = m.project(t)
        return m.finish(naive(q, k, v, **kwargs)[0])

    out, dx, dp = _grads(m, x, m)
    ref, dx_ref, dp_ref = _grads(m, x, reference)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(dx, dx_ref, **TOL)
    for name in dp:
        torch.testing.assert_close(dp[name], dp_ref[name], **TOL, msg=name)


def check_full_attention(spec, causal):
    m = _module(spec, kv_heads=1)
    mha = _module("mha", kv_heads=1, causal=causal)
    mha.load_state_dict(m.state_dict())  # the same projections
    x = _tokens(2, 64, 16)
    torch.testing.assert_close(m(x), mha(x), **TOL)
