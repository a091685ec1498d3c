"""Top-k attention, Dynamic Mask Attention and Sparsifiner (headwise.variants.dynamic): fast paths against their
dense references, forward and gradients in float64 at odd sizes; references against attention written out by
hand; degenerate settings against full (causal) attention; modules, losses and errors."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.core.reference import masked_attention, naive_attention
from headwise.patterns import Causal
from headwise.ops.selection.tokens import dma_mask, topk_mask
from headwise.variants.dynamic import (
    DynamicMaskAttention,
    Sparsifiner,
    TopKAttention,
    dma_attention,
    keep_attention,
    naive_dma_attention,
    naive_topk_attention,
    topk_attention,
)
from headwise.variants.mha import MultiHeadAttention

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def rand(*shape, seed=0, dtype=F64, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def qkvz(N, M=None, *, H=4, H_kv=2, D=8, Dv=6, seed=0, dtype=F64, tied_z=True):
    M = N if M is None else M
    q, k, v = rand(2, H, N, D, seed=seed, dtype=dtype), rand(2, H_kv, M, D, seed=seed + 1, dtype=dtype), \
        rand(2, H_kv, M, Dv, seed=seed + 2, dtype=dtype)
    z = rand(2, H_kv, M, seed=seed + 3, dtype=dtype)
    if tied_z:
        z = z.round()  # few distinct values: the tie rule decides the selection
    return [t.requires_grad_() for t in (q, k, v, z)]


def assert_same_fwd_bwd(fast, ref, inputs, tol=TOL):
    torch.testing.assert_close(fast, ref, **tol)
    g = rand(*fast.shape, seed=99, dtype=fast.dtype)
    gf = torch.autograd.grad(fast, inputs, g)
    gr = torch.autograd.grad(ref, inputs, g)
    for name, a, b in zip("qkvz", gf, gr):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {name}: {m}")


def by_hand(q, k, v, mask, bias=None, scale=None):
    """softmax(scale q k^T + bias | mask) v, one (b, h, i) row at a time (GQA by head index)."""
    B, H, N, D = q.shape
    G = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = torch.nonzero(mask[b, h, i]).flatten()
                s = k[b, h // G, keys] @ q[b, h, i] * scale
                if bias is not None:
                    s = s + bias[b, h // G, keys]
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // G, keys]
    return out


# ---- DMA --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N,window,block",
    [(1, 1, 512), (1, 4, 3), (63, 1, 8), (63, 5, 8), (63, 20, 16), (63, 70, 8), (500, 37, 64), (500, 100, 512)],
    ids=lambda v: str(v),
)
def test_dma_causal_matches_reference_fwd_bwd(N, window, block):
    q, k, v, z = qkvz(N, seed=N + window)
    out = dma_attention(q, k, v, z, window, causal=True, block=block)
    ref, _ = naive_dma_attention(q, k, v, z, window, causal=True)
    assert_same_fwd_bwd(out, ref, (q, k, v, z))


@pytest.mark.parametrize("N,M,window", [(1, 1, 1), (63, 63, 5), (40, 63, 63), (500, 77, 30)], ids=lambda v: str(v))
def test_dma_noncausal_matches_reference_fwd_bwd(N, M, window):
    q, k, v, z = qkvz(N, M, seed=M)
    out = dma_attention(q, k, v, z, window, causal=False)
    ref, _ = naive_dma_attention(q, k, v, z, window, causal=False)
    assert_same_fwd_bwd(out, ref, (q, k, v, z))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dma_reference_is_attention_written_out(causal):
    q, k, v, z = qkvz(11, H=2, H_kv=1, seed=4)
    mask = dma_mask(z.detach(), 11, 4, causal).expand(2, 2, 11, 11)
    ref, _ = naive_dma_attention(q, k, v, z, 4, causal, scale=0.3)
    torch.testing.assert_close(ref, by_hand(q, k, v, mask, z, scale=0.3), **TOL)


@pytest.mark.parametrize("N", [1, 63, 200], ids=lambda n: f"N{n}")
def test_dma_window_covering_everything_is_full_causal_attention(N):
    q, k, v, z = qkvz(N, seed=N)
    zero = torch.zeros_like(z)
    out = dma_attention(q, k, v, zero, N, causal=True, block=16)
    ref, _ = naive_attention(q, k, v, Causal())
    torch.testing.assert_close(out, ref, **TOL)
    full = dma_attention(q, k, v, zero, 10 * N, causal=False)
    torch.testing.assert_close(full, naive_attention(q, k, v)[0], **TOL)
    # with a bias, w >= N is dense causal attention plus the bias
    out = dma_attention(q, k, v, z, N, causal=True, block=16)
    bias_mask = torch.ones(1, 1, N, N, dtype=torch.bool).tril()
    qb = torch.cat([q, torch.full_like(q[..., :1], math.sqrt(8))], -1)
    kb = torch.cat([k, z[..., None]], -1)
    torch.testing.assert_close(out, masked_attention(qb, kb, v, bias_mask, 8 ** -0.5)[0], **TOL)


def test_dma_float32_fast_path_matches_float64_reference():
    q, k, v, z = qkvz(300, H=2, H_kv=2, D=16, Dv=16, seed=7, dtype=torch.float32, tied_z=False)
    out = dma_attention(q, k, v, z, 40, causal=True, block=32)
    g = rand(*out.shape, seed=5, dtype=torch.float32)
    grads = torch.autograd.grad(out, (q, k, v, z), g)
    d = [t.detach().double().requires_grad_() for t in (q, k, v, z)]
    ref, _ = naive_dma_attention(*d, 40, causal=True)
    ref_grads = torch.autograd.grad(ref, d, g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N,window,block", [(1, 3, 1), (63, 20, 8), (63, 9, 16), (500, 100, 32), (77, 40, 39)],
                         ids=lambda v: str(v))
def test_dma_inference_path_matches_reference(N, window, block):
    """Without autograd (and Dv == D, window > block) the common prefix keys go through a second, broadcast-bias
    flash call merged by log-sum-exp; it must give the same output as the reference and the training path."""
    q, k, v, z = qkvz(N, Dv=8, seed=N + 1)
    with torch.no_grad():
        fast = dma_attention(q, k, v, z, window, block=block)
        ref, _ = naive_dma_attention(q, k, v, z, window)
    torch.testing.assert_close(fast, ref, **TOL)
    torch.testing.assert_close(fast, dma_attention(q, k, v, z, window, block=block).detach(), **TOL)


# ---- top-k ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,M,topk,causal,chunk", [
    (1, 1, 1, True, None), (63, 63, 5, True, 7), (63, 63, 64, True, 10), (63, 40, 3, False, 8), (500, 500, 31, True, 97),
    (500, 77, 9, False, None)], ids=lambda v: str(v))
def test_topk_matches_reference_fwd_bwd(N, M, topk, causal, chunk):
    q, k, v, _ = qkvz(N, M, seed=N + topk)
    out = topk_attention(q, k, v, topk, causal=causal, chunk=chunk)
    ref, _ = naive_topk_attention(q, k, v, topk, causal=causal)
    assert_same_fwd_bwd(out, ref, (q, k, v))


def test_topk_reference_is_attention_written_out():
    q, k, v, _ = qkvz(12, H=2, H_kv=1, seed=3)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5).detach()
    mask = topk_mask(s, 3, torch.ones(12, 12, dtype=torch.bool).tril())
    torch.testing.assert_close(naive_topk_attention(q, k, v, 3, causal=True)[0], by_hand(q, k, v, mask), **TOL)


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
    assert_same_fwd_bwd(out, ref, (q, k, v))


# ---- modules ----------------------------------------------------------------------------------------------------
def assert_all_params_get_grads(module, out):
    loss = (out * rand(*out.shape, seed=11, dtype=out.dtype)).sum()
    params = dict(module.named_parameters())
    for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, f"{name}: no gradient"


@pytest.mark.parametrize("bias", ["exp", "linear"])
def test_dma_module_is_projections_bias_and_reference(bias):
    torch.manual_seed(0)
    m = DynamicMaskAttention(32, 4, kv_heads=2, window=6, bias=bias, block=8).double()
    with torch.no_grad():
        m.A.copy_(torch.tensor([0.7, -1.3], dtype=F64))
    x = rand(2, 29, 32, seed=3)
    q, k, v = m.project(x)
    dt = F.softplus(F.linear(v.transpose(1, 2).reshape(2, 29, 16), m.dt_proj.weight, m.dt_proj.bias))  # (B, N, H_kv)
    z = (m.A * dt).transpose(1, 2)
    z = z.exp() if bias == "exp" else z
    torch.testing.assert_close(m.dynamic_bias(v), z, **TOL)
    o, _ = naive_dma_attention(q, k, v, z, 6, causal=True)
    expected = m.mha.out_proj(o.transpose(1, 2).reshape(2, 29, 32))
    out = m(x)
    torch.testing.assert_close(out, expected, **TOL)
    assert_all_params_get_grads(m, out)  # A and dt_proj train through the kept scores


def test_topk_module_covering_everything_is_mha():
    torch.manual_seed(0)
    m = headwise.create("topk(topk=100, causal=True)", dim=16, heads=4, kv_heads=2).double()
    ref = MultiHeadAttention(16, 4, kv_heads=2, pattern=Causal()).double()
    ref.load_state_dict(m.mha.state_dict())
    x = rand(2, 23, 16)
    torch.testing.assert_close(m(x), ref(x), **TOL)
    m = TopKAttention(16, 4, topk=3).double()
    assert m(x, rand(2, 9, 16, seed=1)).shape == (2, 23, 16)  # cross-attention to 9 tokens


def sparsifiner(**kw):
    torch.manual_seed(0)
    return Sparsifiner(16, 2, **{"tokens": 21, "keep_rate": 0.2, **kw}).double()


@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "no-cls"])
def test_sparsifiner_attends_to_the_predicted_budget(cls_token):
    m = sparsifiner(cls_token=cls_token)
    x = rand(2, 21, 16, seed=2)
    q, k, v = m.project(x)
    approx = m.approx_attention(q, k)
    assert approx.shape == (2, 2, 21, 21)
    mask = m.connectivity_mask(q, k)
    rows = mask[:, :, 1:] if cls_token else mask
    assert torch.equal(rows, topk_mask(approx.detach(), 5)[:, :, 1:] if cls_token else topk_mask(approx.detach(), 5))
    assert (rows.sum(-1) == math.ceil(0.2 * 21)).all()
    assert mask[:, :, 0].all() == cls_token
    o = by_hand(q, k, v, mask)
    expected = m.mha.out_proj(o.transpose(1, 2).reshape(2, 21, 16))
    torch.testing.assert_close(m(x), expected, **TOL)


def test_sparsifiner_full_budget_is_mha():
    m = sparsifiner(keep_rate=1.0)
    ref = MultiHeadAttention(16, 2).double()
    ref.load_state_dict(m.mha.state_dict())
    x = rand(2, 21, 16, seed=5)
    torch.testing.assert_close(m(x), ref(x), **TOL)


def test_sparsifiner_distillation_loss_is_the_squared_error_to_the_dense_map():
    m = sparsifiner()
    x = rand(2, 21, 16, seed=6)
    q, k, _ = m.project(x)
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    approx = m.approx_attention(q, k)
    torch.testing.assert_close(m.distillation_loss(x), ((approx - dense)[:, :, 1:] ** 2).sum(), **TOL)
    teacher = torch.softmax(rand(2, 2, 21, 21, seed=7), -1)
    torch.testing.assert_close(m.distillation_loss(x, teacher), ((approx - teacher)[:, :, 1:] ** 2).sum(), **TOL)
    loss = m.distillation_loss(x)
    for name in ("proj_c_q.weight", "proj_c_k.weight", "proj_n", "basis"):
        (g,) = torch.autograd.grad(loss, [dict(m.named_parameters())[name]], retain_graph=True)
        assert g.abs().max() > 0, name


# ---- errors -----------------------------------------------------------------------------------------------------
def _qkv(N=5, M=5):
    return torch.zeros(1, 2, N, 4), torch.zeros(1, 2, M, 4), torch.zeros(1, 2, M, 4)


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 2, 5), 0), ValueError, "window must be a positive int, got window=0"),
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 5), 2), ValueError, "z must be a floating-point tensor [B, H_kv, M] = [1, 2, 5]"),
        (lambda: dma_attention(*_qkv(4, 5), torch.zeros(1, 2, 5), 2), ValueError, "causal attention needs as many queries as keys"),
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 2, 5), 2, block=0), ValueError, "block must be a positive int, got block=0"),
        (lambda: dma_attention(*_qkv(), torch.zeros(1, 2, 5), 2, causal=1), TypeError, "causal must be a bool, got causal=1"),
        (lambda: topk_attention(*_qkv(), 0), ValueError, "topk must be a positive int, got topk=0"),
        (lambda: topk_attention(*_qkv(), 2, chunk=0), ValueError, "chunk must be a positive int, got chunk=0"),
        (lambda: keep_attention(*_qkv(), torch.ones(1, 1, 5, 4, dtype=torch.bool)), ValueError, "keep must be a bool tensor [B, H, N, M]"),
        (lambda: keep_attention(*_qkv(), "all"), TypeError, "keep must be a bool tensor or a callable, got str"),
        (lambda: DynamicMaskAttention(16, 2, bias="sigmoid"), ValueError, "bias must be one of ('exp', 'linear'), got bias='sigmoid'"),
        (lambda: headwise.create("dma(window=0)", dim=16, heads=2), ValueError, "window must be a positive int, got window=0"),
        (lambda: headwise.create("topk(causal='yes')", dim=16, heads=2), ValueError, "causal must be a bool, got causal='yes'"),
        (lambda: Sparsifiner(16, 2), ValueError, "sparsifiner needs tokens="),
        (lambda: Sparsifiner(16, 2, tokens=8, keep_rate=0), ValueError, "keep_rate must be a number in (0, 1], got keep_rate=0"),
        (lambda: sparsifiner()(torch.zeros(1, 20, 16, dtype=F64)), ValueError, "sparsifiner is sized for tokens=21, got x.shape=(1, 20, 16)"),
        (lambda: sparsifiner().distillation_loss(torch.zeros(1, 21, 16, dtype=F64), torch.zeros(3)), ValueError, "teacher must be an attention map"),
        (lambda: DynamicMaskAttention(15, 2), ValueError, "dim must be divisible by heads"),
    ],
    ids=["window", "z-shape", "causal-lengths", "block", "causal-type", "topk", "chunk", "keep-shape", "keep-type",
         "bias-form", "spec-window", "spec-causal", "tokens-missing", "keep-rate", "tokens-mismatch", "teacher", "dim"],
)
def test_bad_configs_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()
