"""capture: probabilities equal the reference, outputs unchanged (bitwise) for every registered variant, memory
bounds, nn.MultiheadAttention, the linear adapters, hook cleanup."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headwise
from headwise import patterns
from headwise.analysis import capture
from headwise.analysis.capture import ADAPTERS, attention_probs, query_subsample
from headwise.core.attention import OBSERVERS
from headwise.core.reference import naive_attention
from headwise.variants.registry import config_fields

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

# variants that need more than headwise.create(name, dim=32, heads=4) and x [2, 16, 32]: (spec, input shapes)
EXTRA = {
    "halo": ("halo(grid=(4, 4), block=2, halo=1)", [(2, 16, 32)]),
    "max_vit": ("max_vit(grid=(4, 4), window=2, grid_size=2)", [(2, 16, 32)]),
    "msa_conv": ("msa_conv(grid=(4, 4))", [(2, 16, 32)]),
    "spectral": ("spectral(grid=(4, 4))", [(2, 16, 32)]),
    "memory_attention": ("memory_attention(memory_dim=16, entries=8)", [(2, 16, 32)]),
    "nin_gate": ("nin_gate(tokens=16)", [(2, 16, 32)]),
    "lka": ("lka", [(2, 32, 4, 4)]),
    "ulsam": ("ulsam(groups=4)", [(2, 32, 4, 4)]),
    "multihead_scan": ("multihead_scan", [(2, 32, 4, 4)]),
    "window_cross": ("window_cross(window=2)", [(2, 32, 4, 4), (2, 32, 2, 2)]),
    "sparsifiner": ("sparsifiner(tokens=16)", [(2, 16, 32)]),
    "vmoba": ("vmoba(grid=(2, 2, 4))", [(2, 16, 32)]),
    "topk": ("topk(topk=4)", [(2, 16, 32)]),  # the default keeps every key at N = 16
}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _build(name):
    """The module and its inputs; a variant added later that needs other arguments is skipped, naming why."""
    spec, shapes = EXTRA.get(name, (name, [(2, 16, 32)]))
    fields = config_fields(name)
    kw = {k: v for k, v in (("dim", 32), ("heads", 4)) if k in fields}
    torch.manual_seed(0)
    try:
        module = headwise.create(spec, **kw).eval()
    except (ValueError, TypeError) as e:
        pytest.skip(f"{name} cannot be built as create({spec!r}, **{kw}): {e}; add it to EXTRA")
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*s, generator=g) for s in shapes]
    try:
        with torch.no_grad():
            module(*xs)
    except (ValueError, TypeError) as e:
        pytest.skip(f"{name} needs other inputs than {shapes}: {e}; add it to EXTRA")
    return module, xs


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
        if r.source == "adapter":  # lightning's implicit matrix has no denominator, by design
            continue
        rows = r.probs.sum(-1)
        assert torch.all(((rows - 1).abs() < 1e-5) | (rows == 0)), r.name


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
def test_linear_adapter_weights_reproduce_the_head_outputs(spec):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=32, heads=4).double().eval()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad(), capture(m) as rec:
        m(x)
        q, k, v, _ = m._project(x)
    r = rec.records[0]
    assert r.source == "adapter" and r.probs.shape == (2, 4, 9, 9)
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


@pytest.mark.parametrize("name", ["moba", "vmoba", "hip", "topk", "dma", "sparsifiner"])
def test_sparse_adapter_weights_reproduce_the_head_outputs(name):
    m, xs = _build(name)
    m, x = m.double(), xs[0].double()
    seen = {}
    out_proj = m.out_proj if hasattr(m, "out_proj") else m.mha.out_proj
    hook = out_proj.register_forward_pre_hook(lambda mod, args: seen.setdefault("heads", args[0]))  # (B, N, H*D)
    try:
        with torch.no_grad(), capture(m) as rec:
            m(x)
    finally:
        hook.remove()
    (r,) = rec.records
    q, k, v = m._tokens(x) if name == "sparsifiner" else m.project(x)
    H = q.shape[1]
    assert r.source == "adapter" and r.probs.shape == (2, H, 16, 16)
    ref = seen["heads"].unflatten(-1, (H, -1)).transpose(1, 2)  # (B, H, N, D) the variant's attention output
    torch.testing.assert_close(r.probs @ v.repeat_interleave(H // v.shape[1], 1), ref, rtol=1e-12, atol=1e-12)
    rows = r.probs.sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows))
    assert (r.probs == 0).any()  # sparse: keys off the selection get exactly zero


def test_adapters_skip_long_inputs_with_a_warning():
    m = headwise.create("linear", dim=32, heads=4)
    with pytest.warns(UserWarning, match="not recorded"), capture(m, adapter_max_tokens=8) as rec:
        m(torch.randn(1, 9, 32))
    assert rec.records == []


def test_protocol_and_registered_adapter():
    class Toy(nn.Module):
        def forward(self, x):
            return x * 2

        def inspect_attention(self, x):
            return torch.full((x.shape[0], 1, x.shape[1], x.shape[1]), 1.0 / x.shape[1])

    class Other(nn.Module):
        def forward(self, x):
            return x + 1

    model = nn.Sequential(Toy(), Other())
    ADAPTERS[Other] = lambda m, args, kwargs: torch.eye(args[0].shape[1])[None, None].expand(args[0].shape[0], 2, -1, -1)
    try:
        with capture(model) as rec:
            model(torch.randn(3, 4, 2))
    finally:
        del ADAPTERS[Other]
    assert [(r.name, r.source, r.heads) for r in rec.records] == [("0", "protocol", 1), ("1", "adapter", 2)]


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
