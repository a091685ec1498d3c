"""Dynamic Mask Attention's functional core (headwise.ops.dma): the fast path against its dense reference, forward
and gradients in float64 at odd sizes; the reference against attention written out row by row; degenerate
settings against full (causal) attention; errors."""

import math
import re

import pytest
import torch

from headwise.core.reference import masked_attention, naive_attention
from headwise.ops.dma import dma_attention, naive_dma_attention
from headwise.ops.selection.tokens import dma_mask
from headwise.ops.topk import rowwise_attention
from headwise.patterns import Causal
from common import TOL, assert_same_forward_and_grads, qkvz, rand


@pytest.mark.parametrize(
    "N,window,chunk",
    [(1, 1, 512), (1, 4, 3), (63, 1, 8), (63, 5, 8), (63, 20, 16), (63, 70, 8), (500, 37, 64), (500, 100, 512)],
    ids=lambda v: str(v),
)
def test_dma_causal_matches_reference_fwd_bwd(N, window, chunk):
    q, k, v, z = qkvz(N, seed=N + window)
    out = dma_attention(q, k, v, z, window, causal=True, chunk=chunk)
    ref, _ = naive_dma_attention(q, k, v, z, window, causal=True)
    assert_same_forward_and_grads(out, ref, (q, k, v, z), seed=99)


@pytest.mark.parametrize("N,M,window", [(1, 1, 1), (63, 63, 5), (40, 63, 63), (500, 77, 30)], ids=lambda v: str(v))
def test_dma_noncausal_matches_reference_fwd_bwd(N, M, window):
    q, k, v, z = qkvz(N, M, seed=M)
    out = dma_attention(q, k, v, z, window, causal=False)
    ref, _ = naive_dma_attention(q, k, v, z, window, causal=False)
    assert_same_forward_and_grads(out, ref, (q, k, v, z), seed=99)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dma_reference_is_attention_written_out(causal):
    q, k, v, z = qkvz(11, H=2, H_kv=1, seed=4)
    mask = dma_mask(z.detach(), 11, 4, causal).expand(2, 2, 11, 11)
    ref, _ = naive_dma_attention(q, k, v, z, 4, causal, scale=0.3)
    torch.testing.assert_close(ref, rowwise_attention(q, k, v, mask, z, scale=0.3), **TOL)


@pytest.mark.parametrize("N", [1, 63, 200], ids=lambda n: f"N{n}")
def test_dma_window_covering_everything_is_full_causal_attention(N):
    q, k, v, z = qkvz(N, seed=N)
    zero = torch.zeros_like(z)
    out = dma_attention(q, k, v, zero, N, causal=True, chunk=16)
    ref, _ = naive_attention(q, k, v, Causal())
    torch.testing.assert_close(out, ref, **TOL)
    full = dma_attention(q, k, v, zero, 10 * N, causal=False)
    torch.testing.assert_close(full, naive_attention(q, k, v)[0], **TOL)
    # with a bias, w >= N is dense causal attention plus the bias
    out = dma_attention(q, k, v, z, N, causal=True, chunk=16)
    bias_mask = torch.ones(1, 1, N, N, dtype=torch.bool).tril()
    qb = torch.cat([q, torch.full_like(q[..., :1], math.sqrt(8))], -1)
    kb = torch.cat([k, z[..., None]], -1)
    torch.testing.assert_close(out, masked_attention(qb, kb, v, bias_mask, 8 ** -0.5)[0], **TOL)


def test_dma_float32_fast_path_matches_float64_reference():
    q, k, v, z = qkvz(300, H=2, H_kv=2, D=16, Dv=16, seed=7, dtype=torch.float32, tied_z=False)
    out = dma_attention(q, k, v, z, 40, causal=True, chunk=32)
    g = rand(*out.shape, seed=5, dtype=torch.float32)
    grads = torch.autograd.grad(out, (q, k, v, z), g)
    d = [t.detach().double().requires_grad_() for t in (q, k, v, z)]
    ref, _ = naive_dma_attention(*d, 40, causal=True)
    ref_grads = torch.autograd.grad(ref, d, g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N,window,chunk", [(1, 3, 1), (63, 20, 8), (63, 9, 16), (500, 100, 32), (77, 40, 39)],
                         ids=lambda v: str(v))
def test_dma_inference_path_matches_reference(N, window, chunk):
    """Without autograd (and Dv == D, window > chunk) the output equals the reference and the training path's."""
    q, k, v, z = qkvz(N, Dv=8, seed=N + 1)
    with torch.no_grad():
        fast = dma_attention(q, k, v, z, window, chunk=chunk)
        ref, _ = naive_dma_attention(q, k, v, z, window)
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(fast, dma_attention(q, k, v, z, window, chunk=chunk).detach(), **TOL)


@pytest.mark.parametrize("N,window,chunk", [(7, 2, 3), (63, 5, 8), (63, 20, 16), (500, 37, 64)], ids=lambda v: str(v))
def test_dma_gathered_sdpa_path_matches_reference_fwd_bwd(N, window, chunk, monkeypatch):
    """The path of other devices (and of CPUs without the compiled extension): each chunk gathers its candidates
    for one batched SDPA call, recomputed in the backward."""
    import headwise.ops.dma.dma as dma

    calls = []
    gathered = dma._dma_blocks_chunk
    monkeypatch.setattr(dma, "extension", lambda: None)
    monkeypatch.setattr(dma, "_dma_blocks_chunk", lambda *a, **kw: calls.append(kw["first"]) or gathered(*a, **kw))
    q, k, v, z = qkvz(N, seed=N + window)
    out = dma_attention(q, k, v, z, window, causal=True, chunk=chunk)
    assert calls, "the gathered-SDPA path did not run"
    ref, _ = naive_dma_attention(q, k, v, z, window, causal=True)
    assert_same_forward_and_grads(out, ref, (q, k, v, z), seed=99)


def _qkv(N=5, M=5):
    return torch.zeros(1, 2, N, 4), torch.zeros(1, 2, M, 4), torch.zeros(1, 2, M, 4)


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 2, 5), 0), ValueError, "window must be a positive int, got window=0"),
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 5), 2), ValueError, "z must be a floating-point tensor [B, H_kv, M] = [1, 2, 5]"),
        (lambda: dma_attention(*_qkv(4, 5), torch.zeros(1, 2, 5), 2), ValueError, "causal attention needs as many queries as keys"),
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 2, 5), 2, chunk=0), ValueError, "chunk must be a positive int, got chunk=0"),
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 2, 5), 2, causal=1), TypeError, "causal must be a bool, got causal=1"),
        (lambda: naive_dma_attention(*_qkv(), torch.zeros(1, 2, 5), 0), ValueError, "window must be a positive int, got window=0"),
    ],
    ids=["window", "z-shape", "causal-lengths", "chunk", "causal-type", "naive-window"],
)
def test_bad_arguments_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()
