"""HiP functional core vs its dense reference and the engine's reference backend (float64)."""

import torch

from headwise.ops.hip import hip_attention, naive_hip_attention
from common import TOL


def test_fast_path_matches_naive_forward_and_gradients():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for causal in (True, False):
        out = hip_attention(q, k, v, block=8, topk=3, causal=causal)
        ref, _ = naive_hip_attention(q, k, v, block=8, topk=3, causal=causal)
        torch.testing.assert_close(out, ref, **TOL)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
            torch.testing.assert_close(a, b, **TOL)
    fast, (kv_blocks, _) = hip_attention(q, k, v, block=8, topk=3, return_selection=True)
    torch.testing.assert_close(fast, hip_attention(q, k, v, block=8, topk=3, backend="reference"), **TOL)
    assert kv_blocks.dtype == torch.long
