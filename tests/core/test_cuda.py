"""GPU paths against the reference (skipped without CUDA; run on a lent GPU machine, never in CI)."""

import pytest
import torch

from headwise.core import attention, choose_backend
from headwise.patterns import Causal, Neighborhood, PerHead, SlidingWindow

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PATTERNS = {
    "causal-offset": Causal(offset=-5),
    "window": SlidingWindow(17),
    "nbhd2d": Neighborhood((13, 17), (5, 7)),
    "nbhd3d-dil": Neighborhood((5, 7, 9), 3, dilation=(1, 2, 1)),
    "per-head": PerHead([Causal(), SlidingWindow(3)]),
}


def _qkv(n, dtype, heads=2, kv_heads=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(2, h, n, 32, device="cuda", dtype=dtype, generator=g).requires_grad_()  # noqa: E731
    return mk(heads), mk(kv_heads), mk(kv_heads)


@pytest.mark.parametrize("backend", ["sdpa", "blocksparse", "flex"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_cuda_backend_matches_reference(backend, name):
    p = PATTERNS[name]
    n = 221 if name == "nbhd2d" else 315 if name == "nbhd3d-dil" else 200
    dtype = torch.float32 if backend == "flex" else torch.float64
    q, k, v = _qkv(n, dtype)
    out, lse = attention(q, k, v, p, backend=backend, return_lse=True)
    ref, ref_lse = attention(q, k, v, p, backend="reference", return_lse=True)
    atol = 2e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    fin = ~torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), ~fin)
    torch.testing.assert_close(lse[fin].to(ref_lse.dtype), ref_lse[fin], atol=atol, rtol=0)
    go = torch.randn_like(out)
    got = torch.autograd.grad((out * go).sum(), (q, k, v))
    want = torch.autograd.grad((ref * go).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=10 * atol, rtol=0)


def test_cuda_auto_prefers_flex_for_sparse():
    q, k, v = _qkv(256, torch.float16)
    assert choose_backend(q, k, v, SlidingWindow(8)) == "flex"
    assert choose_backend(q, k, v, None) == "sdpa"
