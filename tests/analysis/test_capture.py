"""capture: probabilities equal the reference, outputs unchanged (bitwise) for every registered variant, what each
variant's declared ``weights`` capability records, memory bounds, nn.MultiheadAttention, hook cleanup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headwise
from headwise import patterns
from headwise.analysis import capture
from headwise.analysis.capture import attention_probs, query_subsample
from headwise.core.attention import OBSERVERS
from headwise.core.reference import naive_attention
from headwise.variants import registry

# ---- attention_probs against the reference -----------------------------------------------------------------

PATTERNS = {
    "full": None,
    "causal": patterns.Causal(),
    "window3": patterns.SlidingWindow(3),
    "perhead": patterns.PerHead([patterns.Causal(), patterns.SlidingWindow(2), patterns.Full(), patterns.Causal()]),
    "emptyrows": patterns.KeyMask(torch.zeros(63, dtype=torch.bool)),
}


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("shape", [(1, 4, 1, 1, 8), (2, 4, 2, 63, 5)], ids=["B1-H4-Hkv1-N1-D8", "B2-H4-Hkv2-N63-D5"])
def test_probs_times_v_is_reference_output(pattern, shape):
    B, H, Hkv, N, D = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=g) for _ in range(2))
    pat = PATTERNS[pattern]
    if pattern == "emptyrows" and N != 63:
        pat = patterns.KeyMask(torch.zeros(N, dtype=torch.bool))
    p = attention_probs(q, k, pat, None)  # (B, H, N, N)
    ref, _ = naive_attention(q, k, v, pat)
    assert not torch.isnan(p).any()
    torch.testing.assert_close(p @ v.repeat_interleave(H // Hkv, 1), ref, rtol=1e-12, atol=1e-12)
    rows = p.sum(-1)
    assert torch.all((rows - 1).abs() < 1e-12) or pattern == "emptyrows"
    if pattern == "emptyrows":
        assert torch.equal(p, torch.zeros_like(p))
    sub = torch.tensor([0, N - 1])
    torch.testing.assert_close(attention_probs(q, k, pat, None, sub), p[:, :, sub], rtol=1e-13, atol=1e-15)


def test_query_subsample():
    assert query_subsample(10, None) is None and query_subsample(10, 10) is None
    idx = query_subsample(100, 5)
    assert idx.tolist() == [0, 25, 50, 74, 99]


# ---- every registered variant: outputs bitwise unchanged ----------------------------------------------------

def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _build(name, dtype=torch.float32):
    """The variant's declared small example: module (eval mode) and its inputs. A failure here is a failure."""
    torch.manual_seed(0)
    module = registry.get(name).example_module().to(dtype).eval()
    return module, list(module.example(generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", headwise.available())
def test_capture_leaves_outputs_bitwise_unchanged(name):
    module, xs = _build(name)
    with torch.no_grad():
        before = _flat(module(*xs))
        with capture(module, max_queries=5) as rec:
            during = _flat(module(*xs))
        with capture(module, topk=2, keep_qk=True):
            during_topk = _flat(module(*xs))
        after = _flat(module(*xs))
    assert before and len(before) == len(during) == len(during_topk) == len(after)
    for a, b, c, d in zip(before, during, during_topk, after):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert OBSERVERS == []
    for r in rec.records:  # softmax records are distributions over keys (or fully masked rows)
        if module.caps.weights == "scores":  # lightning's implicit matrix has no denominator, by design
            continue
        rows = r.probs.sum(-1)
        assert torch.all(((rows - 1).abs() < 1e-5) | (rows == 0)), r.name


@pytest.mark.parametrize("name", headwise.available())
def test_declared_weights_capability_is_what_capture_records(name):
    """"observed": records from headwise.attention calls; "method": one record from attention_weights per call;
    "none": no record."""
    module, xs = _build(name)
    with torch.no_grad(), capture(module) as rec:
        module(*xs)
    sources = {r.source for r in rec.records}
    declared = module.caps.weights
    if declared == "none":
        assert sources == set(), f"{name} declares weights='none' but records {sources}"
    elif declared in ("method", "scores"):
        assert sources == {"method"} and len(rec.records) == 1, f"{name}: {sources}"
    else:
        assert sources == {"headwise.attention"}, f"{name} declares weights='observed' but records {sources}"


def test_capture_leaves_gradients_unchanged(tiny_lm, tokens):
    loss = lambda: tiny_lm(tokens).logsumexp(-1).mean()  # noqa: E731
    grads = torch.autograd.grad(loss(), list(tiny_lm.parameters()))
    with capture(tiny_lm, keep_qk=True):
        grads2 = torch.autograd.grad(loss(), list(tiny_lm.parameters()))
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


# ---- what is recorded ---------------------------------------------------------------------------------------


def test_records_named_per_module_and_match_reference(tiny_lm, tokens):
    with capture(tiny_lm, keep_qk=True) as rec:
        tiny_lm(tokens)
        tiny_lm(tokens[:1])
    assert rec.modules() == ["blocks.0.attn", "blocks.1.attn"]
    assert [r.call for r in rec.records] == [0, 0, 0, 0]
    r = rec.records[0]
    assert r.source == "headwise.attention" and r.probs.shape == (3, 4, 16, 16) and r.out.shape == (3, 4, 16, 8)
    torch.testing.assert_close(r.probs, attention_probs(r.q, r.k, patterns.Causal()))
    assert torch.all(r.probs.triu(1) == 0)  # the causal pattern was applied
    assert rec.maps()["blocks.0.attn"].shape == (4, 4, 16, 16)


def test_memory_bounds(tiny_lm, tokens):
    with capture(tiny_lm) as full:
        tiny_lm(tokens)
    with capture(tiny_lm, max_queries=4, topk=2, keep_outputs=False) as small:
        tiny_lm(tokens)
    a, b = full.records[0], small.records[0]
    assert b.probs is None and b.out is None and b.topk_values.shape == (3, 4, 4, 2)
    assert b.query_index.tolist() == [0, 5, 10, 15]
    dense = b.dense()
    top = a.probs[:, :, b.query_index].topk(2, dim=-1)
    torch.testing.assert_close(dense.gather(-1, top.indices), top.values)
    assert torch.equal((dense > 0).sum(-1), torch.full((3, 4, 4), 2)) or bool((dense > 0).sum(-1).max() <= 2)


def test_torch_multihead_attention_weights_and_output():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    with torch.no_grad():
        ref_out, ref_w = mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)
        plain, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
        with capture(mha) as rec:
            out, w = mha(x, x, x, attn_mask=mask, need_weights=False)
    assert w is None and torch.equal(out, plain)
    assert rec.records[0].source == "nn.MultiheadAttention"
    torch.testing.assert_close(rec.records[0].probs, ref_w)


def test_torch_encoder_layer_is_captured():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y0 = layer(x)
        with capture(layer) as rec:
            y = layer(x)
    assert torch.equal(y0, y) and rec.modules() == ["self_attn"]


@pytest.mark.parametrize("spec", ["linear", "linear(causal=True)", "lightning"])
def test_linear_attention_weights_reproduce_the_head_outputs(spec):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=32, heads=4).double().eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad(), capture(m) as rec:
        m(x)
        q, k, v, _ = m.features(x)
    r = rec.records[0]
    assert r.source == "method" and r.probs.shape == (2, 4, 9, 9)
    o = r.probs @ v  # what the implicit attention matrix does to the values
    if spec == "lightning":
        from headwise.ops.linear import naive_linear_attention

        ref = naive_linear_attention(q, k, v, m.decay, scale=m.scale)[0]
    else:
        kv = k.transpose(-1, -2) @ v
        ref = (q @ kv) / (q @ k.sum(2, keepdim=True).transpose(-1, -2) + 1e-6) if spec == "linear" else None
        if ref is None:
            from headwise.ops.linear import naive_linear_attention

            ref = naive_linear_attention(q, k, v, None, normalize=True)[0]
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    if spec != "linear":
        assert torch.all(r.probs.triu(1) == 0)


@pytest.mark.parametrize("name", ["moba", "vmoba", "hip", "topk", "dma", "sparsifiner", "rcmha"])
def test_method_weights_reproduce_the_head_outputs(name):
    """The recorded probabilities applied to the values give the variant's own head outputs (before out_proj)."""
    m, xs = _build(name, torch.float64)
    x = xs[0]
    seen = {}
    hook = m.out_proj.register_forward_pre_hook(lambda mod, args: seen.setdefault("heads", args[0]))  # (B, N, H*D)
    try:
        with torch.no_grad(), capture(m) as rec:
            m(x)
    finally:
        hook.remove()
    (r,) = rec.records
    q, k, v = m.project(x)
    H, N = q.shape[1], x.shape[1]
    assert r.source == "method" and r.probs.shape == (x.shape[0], H, N, N)
    ref = seen["heads"].unflatten(-1, (H, -1)).transpose(1, 2)  # (B, H, N, D) the variant's attention output
    torch.testing.assert_close(r.probs @ v.repeat_interleave(H // v.shape[1], 1), ref, rtol=1e-12, atol=1e-12)
    rows = r.probs.sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows))


def test_weights_methods_skip_long_inputs_with_a_warning():
    m = headwise.create("linear", dim=32, heads=4)
    with pytest.warns(UserWarning, match="not recorded"), capture(m, weights_max_tokens=8) as rec:
        m(torch.randn(1, 9, 32))
    assert rec.records == []


def test_any_module_with_attention_weights_is_captured():
    class Toy(nn.Module):
        def forward(self, x):
            return x * 2

        def attention_weights(self, x):
            return torch.full((x.shape[0], 1, x.shape[1], x.shape[1]), 1.0 / x.shape[1])

    class Other(nn.Module):
        def forward(self, x):
            return x + 1

    model = nn.Sequential(Toy(), Other())
    with capture(model) as rec:
        model(torch.randn(3, 4, 2))
    assert [(r.name, r.source, r.heads) for r in rec.records] == [("0", "method", 1)]


def test_calls_outside_the_model_are_not_recorded(tiny_lm, tokens):
    q = torch.randn(1, 2, 3, 4)
    with capture(tiny_lm) as rec:
        headwise.attention(q, q, q)
        tiny_lm(tokens)
        headwise.attention(q, q, q)
    assert rec.modules() == ["blocks.0.attn", "blocks.1.attn"]


def test_hooks_removed_after_an_exception(tiny_lm):
    with pytest.raises(IndexError):
        with capture(tiny_lm):
            tiny_lm(torch.full((1, 4), 99))  # out of the vocabulary
    assert OBSERVERS == []
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_lm.modules())


@pytest.mark.parametrize("kw", [{"max_queries": 0}, {"topk": -1}, {"topk": 2.5}, {"max_queries": True}])
def test_bad_options(tiny_lm, kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        with capture(tiny_lm, **kw):
            pass


def test_not_a_module():
    with pytest.raises(TypeError, match="model"):
        with capture(lambda x: x):
            pass
