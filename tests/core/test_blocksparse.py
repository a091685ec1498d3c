"""The block-sparse engine against the dense reference: outputs, lse and gradients, both executors."""

import math

import pytest
import torch

from headwise.core import blocksparse as bs
from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Full, Neighborhood, PerHead, Segments, SlidingWindow

EXECUTORS = ["kernel", "torch"]


@pytest.fixture(params=EXECUTORS)
def executor(request, monkeypatch):
    """Run the engine with the fused CPU kernel, or force the PyTorch executor."""
    if request.param == "kernel" and bs.extension() is None:
        pytest.skip(f"CPU kernel unavailable: {bs._EXT_ERROR}")
    if request.param == "torch":
        monkeypatch.setattr(bs, "use_kernel", lambda q: False)
    return request.param


def _run(q, k, v, pattern, tile=(16, 16)):
    return bs.blocksparse_attention(q, k, v, pattern, None, True, *tile)


CASES = {
    # id: (B, H, H_kv, N, M, D, Dv, pattern)
    "N1-causal": (1, 2, 2, 1, 1, 8, 8, Causal()),
    "N63-window7": (2, 2, 1, 63, 63, 16, 8, SlidingWindow(7)),
    "N500-causal-window": (1, 2, 2, 500, 500, 16, 16, SlidingWindow(37, causal=True)),
    "N1031-nbhd1d-k65": (1, 2, 1, 1031, 1031, 8, 8, Neighborhood((1031,), 65)),
    "N1031-nbhd1d-dil3-causal": (1, 1, 1, 1031, 1031, 8, 8, Neighborhood((1031,), 9, dilation=3, causal=True)),
    "2d-13x17-k5x7": (1, 4, 2, 221, 221, 16, 16, Neighborhood((13, 17), (5, 7))),
    "2d-13x17-stride-dil": (1, 2, 2, 221, 221, 8, 8, Neighborhood((13, 17), 5, stride=(2, 3), dilation=(2, 1))),
    "3d-5x7x9-k3x5x5": (1, 2, 1, 315, 315, 8, 8, Neighborhood((5, 7, 9), (3, 5, 5))),
    "3d-5x7x9-causal": (1, 2, 2, 315, 315, 8, 8, Neighborhood((5, 7, 9), 3, causal=(True, False, False))),
    "blocked-1d": (1, 2, 2, 200, 200, 8, 8, Neighborhood((200,), 32, stride=32)),
    "segments": (2, 2, 2, 90, 90, 8, 8, Segments(torch.arange(90) % 4)),
    "cross-causal-offset": (1, 2, 1, 40, 100, 8, 4, Causal(offset=60)),
    "empty-rows": (1, 2, 2, 50, 50, 8, 8, Causal(offset=-10)),
    "full-gqa": (2, 4, 1, 70, 45, 8, 8, Full()),
    "union": (1, 2, 2, 128, 128, 8, 8, SlidingWindow(4) | Causal(offset=-100)),
    "intersection": (1, 2, 2, 128, 128, 8, 8, SlidingWindow(20) & Causal()),
    "per-head": (1, 3, 3, 96, 96, 8, 8, PerHead([Causal(), SlidingWindow(5), Full()])),
}


def _inputs(case, dtype, seed=0):
    B, H, Hkv, N, M, D, Dv, pattern = CASES[case]
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, H, N, D), mk(B, Hkv, M, D), mk(B, Hkv, M, Dv), pattern


def _check(case, dtype, atol):
    q, k, v, pattern = _inputs(case, dtype)
    out, lse = _run(q, k, v, pattern)
    ref, ref_lse = naive_attention(q, k, v, pattern)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = ~torch.isinf(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].to(lse.dtype), atol=atol, rtol=0)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(out.shape, generator=g, dtype=dtype)
    glse = torch.randn(lse.shape, generator=g, dtype=dtype)

    def loss(o, l):
        return (o * gout).sum() + (l.masked_fill(torch.isinf(l), 0) * glse).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    want = torch.autograd.grad(loss(ref, ref_lse), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float64(executor, case):
    _check(case, torch.float64, atol=1e-10)


@pytest.mark.parametrize("case", ["N63-window7", "N1031-nbhd1d-k65", "2d-13x17-k5x7", "3d-5x7x9-k3x5x5", "empty-rows"])
def test_matches_reference_float32(executor, case):
    _check(case, torch.float32, atol=1e-5)


def test_bfloat16_runs_in_float32():
    q, k, v, pattern = _inputs("N63-window7", torch.float32)
    q, k, v = (t.detach().bfloat16() for t in (q, k, v))
    out, _ = bs.blocksparse_attention(q, k, v, pattern, None, True)
    ref, _ = naive_attention(q.float(), k.float(), v.float(), pattern)  # same bf16 inputs, float32 maths
    assert out.dtype == torch.bfloat16
    # only the final rounding to bfloat16 differs: half an ulp (2^-9 relative) of each output
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=2.0**-8)


def test_plan_visits_only_scheduled_tiles():
    pattern = Neighborhood((64, 64), 7)
    plan = bs.make_plan(pattern, 4096, 4096)
    density = pattern.density(4096, 4096)
    assert density <= plan.computed_fraction < 0.15  # visited tiles only, never the dense N x N
    rows = math.prod(pattern.tile_shape(64))  # tiles are boxes of the grid (token permutation)
    assert plan.part_mask.shape[1:] == (rows, rows) and plan.q_inv is not None


def test_plan_cache_reuses_hashable_patterns():
    a = bs.make_plan(SlidingWindow(5), 100, 100)
    b = bs.make_plan(SlidingWindow(5), 100, 100)
    assert a is b


def test_cpu_kernel_builds(monkeypatch):
    """The fused kernel must build on our machines (gcc + the pip ninja); the PyTorch executor is only a fallback."""
    if bs.os.environ.get("HEADWISE_NO_EXTENSION"):
        pytest.skip("extension disabled by HEADWISE_NO_EXTENSION")
    assert bs.extension() is not None, bs._EXT_ERROR
