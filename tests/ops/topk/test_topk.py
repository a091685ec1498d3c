"""Top-k and keep-mask attention (headwise.ops.topk): the chunked fast paths against their dense references,
forward and gradients in float64 at odd sizes; the reference against attention written out row by row; degenerate
settings against full (causal) attention; errors."""

import re

import pytest
import torch

from headwise.core.reference import masked_attention, naive_attention
from headwise.ops.selection.tokens import topk_mask
from headwise.ops.topk import keep_attention, naive_topk_attention, rowwise_attention, topk_attention
from headwise.patterns import Causal
from common import TOL, assert_same_forward_and_grads, qkvz


@pytest.mark.parametrize("N,M,topk,causal,chunk", [
    (1, 1, 1, True, None), (63, 63, 5, True, 7), (63, 63, 64, True, 10), (63, 40, 3, False, 8), (500, 500, 31, True, 97),
    (500, 77, 9, False, None)], ids=lambda v: str(v))
def test_topk_matches_reference_fwd_bwd(N, M, topk, causal, chunk):
    q, k, v, _ = qkvz(N, M, seed=N + topk)
    out = topk_attention(q, k, v, topk, causal=causal, chunk=chunk)
    ref, _ = naive_topk_attention(q, k, v, topk, causal=causal)
    assert_same_forward_and_grads(out, ref, (q, k, v), seed=99)


def test_topk_reference_is_attention_written_out():
    q, k, v, _ = qkvz(12, H=2, H_kv=1, seed=3)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5).detach()
    mask = topk_mask(s, 3, torch.ones(12, 12, dtype=torch.bool).tril())
    torch.testing.assert_close(naive_topk_attention(q, k, v, 3, causal=True)[0], rowwise_attention(q, k, v, mask),
                               **TOL)


@pytest.mark.parametrize("N", [1, 63], ids=lambda n: f"N{n}")
def test_topk_covering_everything_is_full_attention(N):
    q, k, v, _ = qkvz(N, seed=N)
    torch.testing.assert_close(topk_attention(q, k, v, N, causal=True), naive_attention(q, k, v, Causal())[0], **TOL)
    torch.testing.assert_close(topk_attention(q, k, v, N + 5), naive_attention(q, k, v)[0], **TOL)


def test_keep_attention_rows_without_keys_are_zero_with_finite_grads():
    q, k, v, _ = qkvz(6, seed=1)
    keep = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    keep[..., ::2, :3] = True  # odd rows have no key
    out = keep_attention(q, k, v, keep, chunk=4)
    assert torch.all(out[:, :, 1::2] == 0) and torch.isfinite(out).all()
    ref, _ = masked_attention(q, k, v, keep)
    assert_same_forward_and_grads(out, ref, (q, k, v), seed=99)


def _qkv(N=5, M=5):
    return torch.zeros(1, 2, N, 4), torch.zeros(1, 2, M, 4), torch.zeros(1, 2, M, 4)


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: topk_attention(*_qkv(), 0), ValueError, "topk must be a positive int, got topk=0"),
        (lambda: topk_attention(*_qkv(), 2, chunk=0), ValueError, "chunk must be a positive int, got chunk=0"),
        (lambda: topk_attention(*_qkv(4, 5), 2, causal=True), ValueError, "causal attention needs as many queries as keys"),
        (lambda: keep_attention(*_qkv(), torch.ones(1, 1, 5, 4, dtype=torch.bool)), ValueError, "keep must be a bool tensor [B, H, N, M]"),
        (lambda: keep_attention(*_qkv(), "all"), TypeError, "keep must be a bool tensor or a callable, got str"),
    ],
    ids=["topk", "chunk", "causal-lengths", "keep-shape", "keep-type"],
)
def test_bad_arguments_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()
