"""headwise.attention: every backend against the reference, auto selection, and clear errors."""

import logging

import pytest
import torch

import headwise
from headwise.core import attention, choose_backend
from headwise.core.reference import naive_attention
from headwise.patterns import Causal, Full, Neighborhood, SlidingWindow


def _qkv(B=1, H=4, Hkv=2, N=65, M=65, D=16, Dv=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g, dtype=dtype), torch.randn(B, Hkv, M, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, M, Dv, generator=g, dtype=dtype))


PATTERNS = {
    "none": None,
    "full": Full(),
    "causal": Causal(),
    "causal-offset": Causal(offset=-4),
    "window": SlidingWindow(6),
    "nbhd2d": Neighborhood((5, 13), 3),
}


@pytest.mark.parametrize("backend", ["sdpa", "blocksparse"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dv", [16, 8], ids=["Dv16", "Dv8"])
def test_backends_match_reference(backend, pattern, dv):
    q, k, v = _qkv(Dv=dv)
    p = PATTERNS[pattern]
    want, want_lse = attention(q, k, v, p, backend="reference", return_lse=True)
    got, got_lse = attention(q, k, v, p, backend=backend, return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    fin = ~torch.isinf(want_lse)
    assert torch.equal(torch.isinf(got_lse), ~fin)
    torch.testing.assert_close(got_lse[fin].double(), want_lse[fin], atol=1e-10, rtol=0)
    assert not torch.isnan(got).any()


def test_flex_eager_matches_reference(monkeypatch):
    monkeypatch.setenv("HEADWISE_FLEX_EAGER", "1")
    q, k, v = _qkv(dtype=torch.float32)
    for p in (Causal(offset=-3), SlidingWindow(4)):
        want = attention(q, k, v, p, backend="reference")
        with torch.no_grad():
            got = attention(q, k, v, p, backend="flex")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_flex_declines_cpu_training():
    q, k, v = _qkv(dtype=torch.float32)
    q.requires_grad_()
    with pytest.raises(ValueError, match="cannot run"):
        attention(q, k, v, Causal(), backend="flex")


def test_sdpa_gradients_match_reference():
    q, k, v = (t.requires_grad_() for t in _qkv(N=33, M=33))
    p = SlidingWindow(3)
    out = attention(q, k, v, p, backend="sdpa")
    ref = attention(q, k, v, p, backend="reference")
    ga = torch.autograd.grad(out.sum(), (q, k, v))
    gb = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_auto_picks_sdpa_for_dense_and_blocksparse_for_sparse(caplog):
    q, k, v = _qkv(H=2, Hkv=2, N=1024, M=1024, dtype=torch.float32)
    assert choose_backend(q, k, v, None) == "sdpa"
    assert choose_backend(q, k, v, Causal()) == "sdpa"
    assert choose_backend(q, k, v, SlidingWindow(16)) == "blocksparse"
    assert choose_backend(q, k, v, SlidingWindow(1000)) == "sdpa"
    with caplog.at_level(logging.DEBUG, logger="headwise.core"):
        attention(q, k, v, SlidingWindow(16))
    assert "blocksparse" in caplog.text


def test_fully_masked_rows_zero_in_every_backend():
    q, k, v = _qkv(dtype=torch.float32)
    p = Causal(offset=-8)
    for backend in ("reference", "sdpa", "blocksparse"):
        out, lse = attention(q, k, v, p, backend=backend, return_lse=True)
        assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8])), backend
        assert torch.isinf(lse[:, :, :8]).all(), backend
        assert not torch.isnan(out).any(), backend


def test_public_entry_point():
    q, k, v = _qkv()
    torch.testing.assert_close(headwise.attention(q, k, v), naive_attention(q, k, v)[0], atol=1e-12, rtol=0)


# ---- errors -------------------------------------------------------------------------------------------
def test_unknown_backend_lists_valid_ones():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend='nope'.*'reference'.*'sdpa'.*'blocksparse'.*'flex'"):
        attention(q, k, v, backend="nope")


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), "same length"),
        (((1, 4, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "multiple of key/value heads"),
        (((1, 4, 8, 16), (1, 2, 8, 8), (1, 2, 8, 16)), "head dims differ"),
        (((2, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "batch sizes differ"),
        (((4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), r"q must be 4-D"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)), "same heads"),
    ],
)
def test_shape_errors(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_dtype_and_type_errors():
    q, k, v = _qkv(dtype=torch.float32)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, k.double(), v)
    with pytest.raises(TypeError, match="floating point"):
        attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        attention(q.numpy(), k, v)
    with pytest.raises(TypeError, match="pattern must be"):
        attention(q, k, v, "causal")
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, scale=-1.0)


def test_pattern_size_errors():
    q, k, v = _qkv(N=64, M=64)
    with pytest.raises(ValueError, match="grid"):
        attention(q, k, v, Neighborhood((7, 7), 3))
    from headwise.patterns import PerHead

    with pytest.raises(ValueError, match="heads"):
        attention(q, k, v, PerHead([Causal(), Full()]))


@pytest.mark.parametrize("backend", ["auto", "sdpa", "blocksparse"])
def test_lse_carries_gradients(backend):
    """Training code merges partial results through the lse: its gradient must be exact in every backend."""
    q, k, v = (t.requires_grad_() for t in _qkv(N=40, M=40))
    for p in (None, SlidingWindow(5)):
        _, lse = attention(q, k, v, p, backend=backend, return_lse=True)
        _, ref = attention(q, k, v, p, backend="reference", return_lse=True)
        got = torch.autograd.grad(lse.sum(), (q, k))  # the lse does not depend on v
        want = torch.autograd.grad(ref.sum(), (q, k))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
