"""chunk_linear_attention (Lightning Attention-2) against the naive quadratic form: forward and gradients."""

from __future__ import annotations

import pytest
import torch

import headwise.ops.linear.chunk as chunk_module
from headwise.ops.linear import chunk_linear_attention, decay_rates, naive_linear_attention, recurrent_linear_attention

F64 = torch.float64
LENGTHS = [1, 63, 500, 1031]  # one token, one partial block, blocks + tail (all heads at once), segments per head


@pytest.mark.parametrize("state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("decay", [False, True], ids=["no-decay", "decay"])
@pytest.mark.parametrize("N", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-6)], ids=["f64", "f32"])
def test_chunk_matches_naive(lin, dtype, tol, N, decay, state):
    case = lin.make_case(N, decay, state)
    lin.assert_matches(lin.run_op(chunk_linear_attention, case, dtype), lin.reference(N, decay, state), tol)


@pytest.mark.parametrize("N", [63, 1031], ids=lambda n: f"N{n}")
def test_chunk_normalized_matches_naive(lin, N):
    case = lin.make_case(N, decay=True, state=True, normalize=True)
    lin.assert_matches(lin.run_op(chunk_linear_attention, case), lin.reference(N, True, True, True), 1e-10)


@pytest.mark.parametrize("block_size", [1, 7, 64, 600], ids=lambda b: f"L{b}")
def test_block_sizes(lin, block_size):
    case = lin.make_case(500, decay=True, state=True)
    lin.assert_matches(lin.run_op(chunk_linear_attention, case, block_size=block_size),
                       lin.reference(500, True, True), 1e-10)


@pytest.mark.parametrize("N", [500, 530], ids=lambda n: f"N{n}")
def test_several_segments_per_head(lin, monkeypatch, N):
    """Runs of 128 tokens per head: N = 500 has 15 blocks of 32 (runs of 4, 4, 4, 3) and a tail of 20."""
    monkeypatch.setattr(chunk_module, "_SEGMENT_TOKENS", 128)
    case = lin.make_case(N, decay=True, state=True)
    lin.assert_matches(lin.run_op(chunk_linear_attention, case, block_size=32), lin.reference(N, True, True), 1e-10)


@pytest.mark.parametrize("N", [63, 500], ids=lambda n: f"N{n}")
def test_heads_in_groups(lin, monkeypatch, N):
    """Short sequences go several heads per unit: 2 heads (of B x H = 6) per unit, the tail block copied."""
    monkeypatch.setattr(chunk_module, "_GROUP_TOKENS", 2 * N)
    case = lin.make_case(N, decay=True, state=True)
    lin.assert_matches(lin.run_op(chunk_linear_attention, case, block_size=16), lin.reference(N, True, True), 1e-10)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalized"])
def test_state_carried_across_two_calls_equals_one_call(lin, normalize):
    case = lin.make_case(1031, decay=True, state=True, normalize=normalize)
    whole = lin.run_op(chunk_linear_attention, case)
    q, k, v, s0 = (case[n].clone().requires_grad_() for n in ("q", "k", "v", "initial_state"))
    kw = dict(scale=lin.SCALE, normalize=normalize, output_final_state=True)
    o1, mid = chunk_linear_attention(q[:, :, :500], k[:, :, :500], v[:, :, :500], case["decay"], initial_state=s0, **kw)
    o2, final = chunk_linear_attention(q[:, :, 500:], k[:, :, 500:], v[:, :, 500:], case["decay"], initial_state=mid,
                                       **kw)
    o = torch.cat([o1, o2], dim=2)
    loss = (o * case["grad_out"]).sum() + (final * case["grad_state"]).sum()
    split = [o.detach(), final.detach(), *torch.autograd.grad(loss, [q, k, v, s0])]
    lin.assert_matches(split, whole, 1e-10)


@pytest.mark.parametrize("D,Dv", [(1, 5), (5, 1), (1, 1)], ids=["D1", "Dv1", "D1-Dv1"])
def test_one_wide_heads(D, Dv):
    """Width-1 heads make transposed states contiguous views: the scans must still work on copies."""
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 2, 77, D, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 77, Dv, generator=g, dtype=F64, requires_grad=True)
    s0 = torch.randn(2, 2, D, Dv, generator=g, dtype=F64, requires_grad=True)
    kept = s0.detach().clone()
    results = []
    for op in (chunk_linear_attention, naive_linear_attention):
        o, final = op(q, k, v, 0.9, initial_state=s0, output_final_state=True)
        results.append([o, final, *torch.autograd.grad(o.sum() + 2 * final.sum(), [q, k, v, s0])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert torch.equal(s0.detach(), kept)


def test_without_final_state_and_without_grad():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=g) for _ in range(3))
    o, final = chunk_linear_attention(q, k, v, 0.9)
    assert final is None and o.shape == (1, 2, 100, 8) and not o.requires_grad
    torch.testing.assert_close(o, naive_linear_attention(q, k, v, 0.9)[0], rtol=1e-5, atol=1e-5)


def test_gradient_only_for_some_inputs():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g, dtype=F64) for _ in range(3))
    k.requires_grad_()
    (dk,) = torch.autograd.grad(chunk_linear_attention(q, k, v, 0.95)[0].sum(), [k])
    k_ref = k.detach().clone().requires_grad_()
    (dk_ref,) = torch.autograd.grad(naive_linear_attention(q, k_ref, v, 0.95)[0].sum(), [k_ref])
    torch.testing.assert_close(dk, dk_ref, rtol=1e-10, atol=1e-10)


def test_bfloat16_runs_in_float32():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 90, 16, generator=g) for _ in range(3))
    o16, final16 = chunk_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.9, output_final_state=True)
    o32, _ = chunk_linear_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), 0.9)
    assert o16.dtype == final16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.float(), o32, rtol=1e-2, atol=1e-2 * o32.abs().max().item())


def test_strong_decay_does_not_overflow():
    """lambda^(block) underflows to 0 in float32 for tiny lambda: the chunked op must stay finite and exact."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g, dtype=F64) for _ in range(3))
    decay = torch.tensor([1e-30, 0.5], dtype=F64)
    o, _ = chunk_linear_attention(q.float(), k.float(), v.float(), decay)
    ref, _ = naive_linear_attention(q, k, v, decay)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


IMPLS = {"naive": naive_linear_attention, "recurrent": recurrent_linear_attention, "chunk": chunk_linear_attention}


def _qkv(N=10, D=4, Dv=4, H=2, B=1):
    return torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, Dv)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("change,match", [
    (lambda a: dict(a, k=a["k"][:, :, :5]), r"q and k must have the same shape"),
    (lambda a: dict(a, v=a["v"][:, :1]), r"v must be \[B, H, N, Dv\]"),
    (lambda a: dict(a, q=a["q"][0]), r"q must be 4-D"),
    (lambda a: dict(a, v=a["v"].double()), r"share a dtype"),
    (lambda a: dict(a, decay=0.0), r"decay must lie in \(0, 1\]"),
    (lambda a: dict(a, decay=1.5), r"decay must lie in \(0, 1\]"),
    (lambda a: dict(a, decay=-0.1), r"decay must lie in \(0, 1\]"),
    (lambda a: dict(a, decay=float("nan")), r"decay must lie in \(0, 1\]"),
    (lambda a: dict(a, decay=torch.tensor([0.5, 0.5, 0.5])), r"one rate per head, shape \(2,\)"),
    (lambda a: dict(a, decay=torch.tensor([0.5, 0.9], requires_grad=True)), r"decay must be a constant"),
    (lambda a: dict(a, decay="0.5"), r"decay must be a float"),
    (lambda a: dict(a, initial_state=torch.zeros(1, 2, 4, 5)), r"initial_state must be \[B, H, D, Dv\] = \[1, 2, 4, 4\]"),
    (lambda a: dict(a, normalize=True, initial_state=torch.zeros(1, 2, 4, 4)), r"\[B, H, D, Dv \+ 1\] = \[1, 2, 4, 5\]"),
    (lambda a: dict(a, scale=0.0), r"scale must be a positive finite number"),
    (lambda a: dict(a, scale=None), r"scale must be a positive finite number"),
], ids=["k-length", "v-heads", "q-3d", "v-dtype", "decay-0", "decay-1.5", "decay-negative", "decay-nan",
        "decay-shape", "decay-grad", "decay-str", "state-shape", "state-normalizer", "scale-0", "scale-None"])
def test_bad_inputs(impl, change, match):
    q, k, v = _qkv()
    args = change(dict(q=q, k=k, v=v, decay=0.9))
    with pytest.raises((ValueError, TypeError), match=match):
        IMPLS[impl](args.pop("q"), args.pop("k"), args.pop("v"), args.pop("decay"), **args)


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_block_size(block_size):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"block_size must be a positive int, got block_size="):
        chunk_linear_attention(q, k, v, block_size=block_size)


def test_decay_one_is_no_decay():
    q, k, v = _qkv(N=130)
    torch.testing.assert_close(chunk_linear_attention(q, k, v, 1.0)[0], chunk_linear_attention(q, k, v)[0])
    torch.testing.assert_close(chunk_linear_attention(q, k, v, decay_rates(2) ** 0)[0], chunk_linear_attention(q, k, v)[0])
