"""recurrent_linear_attention (token by token, the decoding path) against the naive quadratic form."""

from __future__ import annotations

import pytest
import torch

from headwise.ops.linear import chunk_linear_attention, recurrent_linear_attention


@pytest.mark.parametrize("state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("N", [1, 63, 500, 1031], ids=lambda n: f"N{n}")
# float32: the state takes N sequential rounded updates (the chunked op sums within blocks), measured up to
# 2.6e-6 of the largest magnitude at N = 1031, so a wider bound than the chunked op's 2e-6
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_recurrent_matches_naive(lin, dtype, tol, N, decay, state):
    case = lin.make_case(N, decay, state)
    lin.assert_matches(lin.run_op(recurrent_linear_attention, case, dtype), lin.reference(N, decay, state), tol)


def test_recurrent_normalized_matches_naive(lin):
    case = lin.make_case(63, decay=True, state=True, normalize=True)
    lin.assert_matches(lin.run_op(recurrent_linear_attention, case), lin.reference(63, True, True, True), 1e-10)


def test_chunked_prefill_then_recurrent_steps(lin):
    """Decoding: the chunked op over a prompt, then one recurrent step per token, equals one pass over all."""
    case = lin.make_case(200, decay=True, state=False)
    q, k, v, lam = case["q"], case["k"], case["v"], case["decay"]
    whole, final = chunk_linear_attention(q, k, v, lam, output_final_state=True)
    outs, state = [], None
    o, state = chunk_linear_attention(q[:, :, :150], k[:, :, :150], v[:, :, :150], lam, output_final_state=True)
    outs.append(o)
    for t in range(150, 200):
        o, state = recurrent_linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], lam,
                                              initial_state=state, output_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)
