"""Shared inputs of the linear-attention tests: seeded q, k, v, initial state and upstream gradients."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from headwise.ops.linear import decay_rates, naive_linear_attention

F64 = torch.float64

# B, H, D, Dv of the comparisons: H = 3 exercises the ALiBi slopes of a non-power-of-two head count,
# lambda ~ (0.94, 0.996, 0.78); Dv != D catches transposed states
SHAPE = dict(B=2, H=3, D=16, Dv=8)
SCALE = 0.25  # not 1, so a misplaced scale shows


def make_case(N: int, decay: bool, state: bool, normalize: bool = False, seed: int = 0) -> dict:
    """float64 inputs and upstream gradients for one comparison case (positive features when normalizing)."""
    B, H, D, Dv = SHAPE["B"], SHAPE["H"], SHAPE["D"], SHAPE["Dv"]
    g = torch.Generator().manual_seed(seed * 100003 + N)
    q, k = (torch.randn(B, H, N, D, generator=g, dtype=F64) for _ in range(2))
    if normalize:
        q, k = q.sigmoid(), k.sigmoid()  # positive feature maps keep the normalizer away from zero
    v = torch.randn(B, H, N, Dv, generator=g, dtype=F64)
    width = Dv + int(normalize)
    s0 = None
    if state:
        s0 = torch.rand(B, H, D, width, generator=g, dtype=F64) if normalize else torch.randn(B, H, D, width, generator=g, dtype=F64)
    return dict(
        q=q, k=k, v=v, initial_state=s0,
        decay=decay_rates(H) if decay else None,
        normalize=normalize,
        grad_out=torch.randn(B, H, N, Dv, generator=g, dtype=F64),
        grad_state=torch.randn(B, H, D, width, generator=g, dtype=F64),
    )


def run_op(op, case: dict, dtype=F64, **kwargs) -> list[torch.Tensor]:
    """``[o, final_state, dq, dk, dv, (d initial_state)]`` of ``op`` on the case cast to ``dtype``; the loss is
    a fixed random projection of the output and of the final state."""
    inputs = [case[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    s0 = case["initial_state"]
    if s0 is not None:
        inputs.append(s0.to(dtype).requires_grad_())
    o, final = op(*inputs[:3], case["decay"], scale=SCALE, normalize=case["normalize"],
                  initial_state=inputs[3] if s0 is not None else None, output_final_state=True, **kwargs)
    loss = (o * case["grad_out"].to(dtype)).sum() + (final * case["grad_state"].to(dtype)).sum()
    return [o.detach(), final.detach(), *torch.autograd.grad(loss, inputs)]


@functools.lru_cache(maxsize=None)
def reference(N: int, decay: bool, state: bool, normalize: bool = False) -> list[torch.Tensor]:
    """The naive float64 results of a case (cached: several implementations compare against them)."""
    return run_op(naive_linear_attention, make_case(N, decay, state, normalize))


def assert_matches(got: list[torch.Tensor], ref: list[torch.Tensor], tol: float) -> None:
    """Every tensor within ``tol`` of the reference, relative to the reference's largest magnitude."""
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    assert len(got) == len(ref)
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape, name
        err = (a.to(F64) - b).abs().max().item()
        bound = tol * max(1.0, b.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


@pytest.fixture(scope="session")
def lin():
    """The helpers above, for the test modules (fixtures need no import of this conftest)."""
    return SimpleNamespace(make_case=make_case, run_op=run_op, reference=reference, assert_matches=assert_matches,
                           SCALE=SCALE, SHAPE=SHAPE)
