"""MoBA / VMoBA functional cores vs their dense references and the engine's reference backend (float64)."""

import pytest
import torch

from headwise.ops.moba import moba_attention, naive_moba_attention, naive_vmoba_attention, vmoba_attention
from common import TOL, assert_same_forward_and_grads


def _qkv(N, H=2, H_kv=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, N, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, H_kv, H_kv)]


@pytest.mark.parametrize("fn, naive, kw, N, H_kv", [
    (moba_attention, naive_moba_attention, dict(block=16, topk=2), 96, 2),
    (moba_attention, naive_moba_attention, dict(block=7, topk=3, causal=False), 96, 2),
    (moba_attention, naive_moba_attention, dict(block=8, topk=3), 1, 1),
    (moba_attention, naive_moba_attention, dict(block=8, topk=3), 63, 1),
    (moba_attention, naive_moba_attention, dict(block=32, topk=4), 500, 1),
    (vmoba_attention, naive_vmoba_attention, dict(grid=(4, 4, 6), partition="2d", block=(2, 3)), 96, 2),
    (vmoba_attention, naive_vmoba_attention, dict(grid=(3, 3, 7), partition="1d", block=1), 63, 1),
], ids=["moba-N96", "moba-noncausal-N96", "moba-N1-gqa", "moba-N63-gqa", "moba-N500-gqa", "vmoba-2d-N96",
        "vmoba-1d-N63-gqa"])
def test_fast_path_matches_naive_forward_and_gradients(fn, naive, kw, N, H_kv):
    q, k, v = _qkv(N, H=2, H_kv=H_kv)
    out = fn(q, k, v, **kw)
    ref, _ = naive(q, k, v, **kw)
    assert_same_forward_and_grads(out, ref, (q, k, v), TOL, seed=1)


def test_reference_backend_and_selection():
    q, k, v = (t.detach() for t in _qkv(96))
    for fn, kw in ((moba_attention, dict(block=16, topk=2)),
                   (vmoba_attention, dict(grid=(4, 4, 6), partition="2d", block=(2, 3)))):
        fast, selection = fn(q, k, v, return_selection=True, **kw)
        torch.testing.assert_close(fast, fn(q, k, v, backend="reference", **kw), **TOL)
        assert selection.dtype == torch.bool
