"""The chunked selective scan against the step-by-step reference (forward and gradients, float64), and the
reference against the recurrence worked out by hand."""

import pytest
import torch
import torch.nn.functional as F

from headwise.ops.scan import chunk_selective_scan, recurrent_selective_scan
from common import F64, assert_same_forward_and_grads


def scan_inputs(B, K, L, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, L, d, generator=g, dtype=F64)
    delta = F.softplus(torch.randn(B, K, L, d, generator=g, dtype=F64))
    A = -torch.exp(torch.randn(K, d, n, generator=g, dtype=F64))
    Bm = torch.randn(B, K, L, n, generator=g, dtype=F64)
    Cm = torch.randn(B, K, L, n, generator=g, dtype=F64)
    D = torch.randn(K, d, generator=g, dtype=F64)
    return [t.requires_grad_() for t in (x, delta, A, Bm, Cm, D)]


@pytest.mark.parametrize("L,chunk", [(1, 4), (63, 16), (100, 32), (37, 37), (20, 64)],
                         ids=lambda v: str(v))
def test_chunk_selective_scan_matches_recurrent(L, chunk):
    inputs = scan_inputs(2, 3, L, 4, 5)
    out = chunk_selective_scan(*inputs, chunk=chunk)
    ref = recurrent_selective_scan(*inputs)
    assert_same_forward_and_grads(out, ref, inputs, 1e-10, seed=3, grad_tol=1e-9)


def test_recurrent_selective_scan_first_steps_by_hand():
    """Step 0: h = delta x B, y = C h + D x; step 1 adds the decayed state."""
    x, delta, A, Bm, Cm, D = (t.detach() for t in scan_inputs(1, 1, 2, 1, 1))
    y = recurrent_selective_scan(x, delta, A, Bm, Cm, D)[0, 0, :, 0]
    h0 = delta[0, 0, 0, 0] * x[0, 0, 0, 0] * Bm[0, 0, 0, 0]
    h1 = torch.exp(delta[0, 0, 1, 0] * A[0, 0, 0]) * h0 + delta[0, 0, 1, 0] * x[0, 0, 1, 0] * Bm[0, 0, 1, 0]
    torch.testing.assert_close(y[0], Cm[0, 0, 0, 0] * h0 + D[0, 0] * x[0, 0, 0, 0])
    torch.testing.assert_close(y[1], Cm[0, 0, 1, 0] * h1 + D[0, 0] * x[0, 0, 1, 0])
