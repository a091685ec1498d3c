"""MultiHeadAttention / GQA / MQA against the float64 reference (naive_mha) and torch.nn.MultiheadAttention."""

import re

import pytest
import torch
from torch import nn

import headwise
from headwise.patterns import Causal, Full, PerHead
from headwise.variants.mha import GroupedQueryAttention, MultiHeadAttention, MultiQueryAttention, naive_mha
from common import (
    F64,
    assert_backward_reaches_every_parameter,
    assert_loads_old_checkpoint,
    assert_same_forward_and_grads,
    fused_checkpoint,
)


def padding(lengths, M):
    """``[B, M]`` bool key padding mask, True past each element's length."""
    return torch.arange(M)[None, :] >= torch.tensor(lengths)[:, None]


# (variant, heads, kv_heads): MHA, GQA, MQA and a single head
VARIANTS = {"mha-H4": ("mha", 4, None), "gqa-H8-kv2": ("gqa", 8, None), "mqa-H4": ("mqa", 4, None), "mha-H1": ("mha", 1, None)}
# (N, M or None for self-attention, lengths of the key padding or None, pattern)
CASES = {
    "self-N1": (1, None, None, None),
    "self-N63-causal": (63, None, None, Causal()),
    "self-N63-pad": (63, None, [63, 20, 63, 1], None),
    "self-N63-pad-causal": (63, None, [63, 20, 63, 1], Causal()),
    "cross-N17-M40": (17, 40, None, None),
    "cross-N17-M40-pad": (17, 40, [40, 9, 0], None),  # element 2 is all padding: zeros before out_proj
    "cross-N17-M40-pad-causal-offset": (17, 40, [40, 30, 9], Causal(offset=23)),
}


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_matches_naive_float64(variant, case, backend):
    name, heads, kv_heads = VARIANTS[variant]
    N, M, lengths, pattern = CASES[case]
    torch.manual_seed(0)
    m = headwise.create(name, dim=32, heads=heads, kv_heads=kv_heads, pattern=pattern, backend=backend).to(F64)
    B = len(lengths) if lengths else 2
    x = torch.randn(B, N, 32, dtype=F64, requires_grad=True)
    context = None if M is None else torch.randn(B, M, 32, dtype=F64, requires_grad=True)
    kpm = None if lengths is None else padding(lengths, M or N)
    out = m(x, context, key_padding_mask=kpm)
    ref = naive_mha(m, x, context, kpm)
    assert out.shape == (B, N, 32)
    assert_same_forward_and_grads(out, ref, [x] + ([] if context is None else [context]) + list(m.parameters()))


def test_float32_matches_float64_naive():
    torch.manual_seed(0)
    m = MultiHeadAttention(48, 6, kv_heads=3, pattern=Causal())
    x = torch.randn(3, 50, 48)
    kpm = padding([50, 31, 7], 50)
    out = m(x, key_padding_mask=kpm)
    ref = naive_mha(m.to(F64), x.to(F64), key_padding_mask=kpm)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_head_dim_independent_of_dim():
    torch.manual_seed(0)
    m = MultiHeadAttention(30, 4, head_dim=16, qkv_bias=False, out_bias=False).to(F64)
    assert (m.q_proj.out_features, m.k_proj.out_features, m.v_proj.out_features, m.out_proj.in_features) == (64, 64, 64, 64)
    assert m.q_proj.bias is None and m.k_proj.bias is None and m.v_proj.bias is None and m.out_proj.bias is None
    x = torch.randn(2, 11, 30, dtype=F64)
    torch.testing.assert_close(m(x), naive_mha(m, x), rtol=1e-10, atol=1e-10)


def test_headwise_attention_reference_matches_module_projections():
    """The module is projections around headwise.attention: rebuilt from its weights with the reference backend."""
    torch.manual_seed(0)
    m = GroupedQueryAttention(32, 8, kv_heads=2, pattern=Causal()).to(F64)
    x = torch.randn(2, 21, 32, dtype=F64)
    q = m.q_proj(x).view(2, 21, 8, 4).transpose(1, 2)  # (B, H, N, D)
    k, v = (p(x).view(2, 21, 2, 4).transpose(1, 2) for p in (m.k_proj, m.v_proj))  # (B, H_kv, N, D)
    o = headwise.attention(q, k, v, Causal(), backend="reference").transpose(1, 2).reshape(2, 21, 32)
    torch.testing.assert_close(m(x), m.out_proj(o), rtol=1e-12, atol=1e-12)


def _torch_mha_from(m: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(m.dim, m.heads, batch_first=True, dtype=m.q_proj.weight.dtype)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))  # [W_q; W_k; W_v]
        ref.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        ref.out_proj.weight.copy_(m.out_proj.weight)
        ref.out_proj.bias.copy_(m.out_proj.bias)
    return ref


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_matches_torch_multihead_attention(cross, padded, dtype):
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 8).to(dtype)
    ref = _torch_mha_from(m)
    B, N, M = 3, 37, (29 if cross else 37)
    x = torch.randn(B, N, 64, dtype=dtype)
    c = torch.randn(B, M, 64, dtype=dtype) if cross else x
    kpm = padding([M, 13, 1], M) if padded else None  # torch gives NaN on all-padding rows: none here
    tol = 1e-10 if dtype == F64 else 1e-5
    for mode in ("train", "eval"):  # eval may take torch's fused fast path
        getattr(m, mode)(), getattr(ref, mode)()
        expected = ref(x, c, c, key_padding_mask=kpm, need_weights=False)[0]
        torch.testing.assert_close(m(x, c if cross else None, key_padding_mask=kpm), expected, rtol=tol, atol=tol)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """Query head h reads key/value head h // (H / H_kv): MHA with each kv head's weights copied to its group."""
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(48, 6, kv_heads=2).to(F64)
    mha = MultiHeadAttention(48, 6).to(F64)
    with torch.no_grad():
        mha.q_proj.load_state_dict(gqa.q_proj.state_dict())
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for name in ("k_proj", "v_proj"):  # each kv head's rows repeated for the 3 query heads of its group
            w = getattr(gqa, name).weight.view(2, 8, 48).repeat_interleave(3, dim=0)  # (H, D, C)
            b = getattr(gqa, name).bias.view(2, 8).repeat_interleave(3, dim=0)  # (H, D)
            getattr(mha, name).weight.copy_(w.reshape(48, 48))
            getattr(mha, name).bias.copy_(b.reshape(48))
    x = torch.randn(2, 19, 48, dtype=F64)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "spec, kv_heads, kv_features",
    [("mha", 8, 8 * 8), ("gqa", 2, 2 * 8), ("gqa(kv_heads=4)", 4, 4 * 8), ("mqa", 1, 1 * 8)],
    ids=["mha", "gqa-default", "gqa-kv4", "mqa"],
)
def test_kv_heads_and_shapes(spec, kv_heads, kv_features):
    m = headwise.create(spec, dim=64, heads=8)
    assert m.config.kv_heads == kv_heads == m.kv_heads
    assert m.q_proj.weight.shape == (64, 64)
    assert m.k_proj.weight.shape == m.v_proj.weight.shape == (kv_features, 64)
    x = torch.randn(2, 10, 64)
    assert m(x).shape == (2, 10, 64)
    assert m(x, torch.randn(2, 3, 64)).shape == (2, 10, 64)


def test_variant_classes():
    assert isinstance(headwise.create("gqa", dim=64, heads=8), GroupedQueryAttention)
    assert isinstance(headwise.create("mqa", dim=64, heads=8), MultiQueryAttention)
    assert headwise.MultiHeadAttention is MultiHeadAttention
    assert MultiQueryAttention(64, 8).config.kv_heads == 1


@pytest.mark.parametrize("spec", ["mha", "gqa", "mqa"])
def test_gradients_reach_every_parameter(spec):
    torch.manual_seed(0)
    m = headwise.create(spec, dim=32, heads=4 if spec != "gqa" else 8, pattern=Causal())
    x = torch.randn(3, 12, 32, requires_grad=True)
    assert_backward_reaches_every_parameter(m, m(x, key_padding_mask=padding([12, 5, 9], 12)), x)


def test_causal_pattern_changes_result_as_the_reference_says():
    torch.manual_seed(0)
    full = MultiHeadAttention(32, 4).to(F64)
    causal = MultiHeadAttention(32, 4, pattern=Causal()).to(F64)
    causal.load_state_dict(full.state_dict())
    x = torch.randn(2, 16, 32, dtype=F64)
    out_full, out_causal = full(x), causal(x)
    torch.testing.assert_close(out_causal, naive_mha(causal, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_causal[:, -1], out_full[:, -1], rtol=1e-10, atol=1e-10)  # last row sees all
    assert (out_causal[:, :-1] - out_full[:, :-1]).abs().amax(-1).min() > 1e-3  # every other row differs
    # token i does not depend on later tokens
    x2 = x.clone()
    x2[:, 10:] = torch.randn(2, 6, 32, dtype=F64)
    torch.testing.assert_close(causal(x2)[:, :10], out_causal[:, :10], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(full(x2)[:, :10], out_full[:, :10])


def test_full_pattern_equals_no_pattern():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4).to(F64)
    with_full = MultiHeadAttention(32, 4, pattern=Full()).to(F64)
    with_full.load_state_dict(m.state_dict())
    x = torch.randn(2, 9, 32, dtype=F64)
    torch.testing.assert_close(with_full(x), m(x), rtol=1e-12, atol=1e-12)


def test_per_head_pattern():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, pattern=PerHead([Causal(), Full(), Causal(offset=-2), Causal(offset=3)])).to(F64)
    x = torch.randn(2, 13, 32, dtype=F64)
    kpm = padding([13, 6], 13)
    torch.testing.assert_close(m(x, key_padding_mask=kpm), naive_mha(m, x, key_padding_mask=kpm), rtol=1e-10, atol=1e-10)


def test_pattern_spec_string():
    m = MultiHeadAttention(32, 4, pattern="causal")
    assert m.config.pattern == headwise.patterns.from_spec("causal") == m.pattern
    assert isinstance(m.pattern, headwise.patterns.Pattern)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_all_padding_element_gives_output_bias_and_no_nan(backend):
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, backend=backend)
    x = torch.randn(2, 7, 32, requires_grad=True)
    out = m(x, key_padding_mask=padding([7, 0], 7))
    torch.testing.assert_close(out[1], m.out_proj.bias.expand(7, 32))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.k_proj.weight.grad).all()
    assert x.grad[1].abs().sum() == 0  # element 1 attends nothing: its tokens get no gradient


def test_padding_without_padded_keys_equals_no_mask():
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, pattern=Causal())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(m(x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool)), m(x), rtol=0, atol=0)


def test_dropout_on_output():
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 8, dropout=0.5)
    x = torch.randn(4, 32, 64)
    m.eval()
    clean = m(x)
    torch.testing.assert_close(m(x), clean, rtol=0, atol=0)
    m.train()
    dropped = m(x)
    kept = dropped != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(dropped[kept], 2 * clean[kept])  # inverted dropout scale 1 / (1 - p)


# ---- configuration and input errors ----------------------------------------------------------------------

BAD_CONFIGS = [
    ("dim-zero", MultiHeadAttention, dict(dim=0, heads=4), ValueError, "dim=0"),
    ("dim-float", MultiHeadAttention, dict(dim=64.0, heads=4), TypeError, "dim=64.0"),
    ("heads-bool", MultiHeadAttention, dict(dim=64, heads=True), TypeError, "heads=True"),
    ("heads-negative", MultiHeadAttention, dict(dim=64, heads=-2), ValueError, "heads=-2"),
    ("dim-not-divisible", MultiHeadAttention, dict(dim=64, heads=3), ValueError, "dim=64 heads=3"),
    ("kv-not-divisor", MultiHeadAttention, dict(dim=64, heads=8, kv_heads=3), ValueError, "kv_heads=3"),
    ("kv-zero", MultiHeadAttention, dict(dim=64, heads=8, kv_heads=0), ValueError, "kv_heads=0"),
    ("head-dim-zero", MultiHeadAttention, dict(dim=64, heads=8, head_dim=0), ValueError, "head_dim=0"),
    ("dropout-one", MultiHeadAttention, dict(dim=64, heads=8, dropout=1.0), ValueError, "dropout=1.0"),
    ("dropout-negative", MultiHeadAttention, dict(dim=64, heads=8, dropout=-0.1), ValueError, "dropout=-0.1"),
    ("dropout-string", MultiHeadAttention, dict(dim=64, heads=8, dropout="0.1"), TypeError, "dropout='0.1'"),
    ("bias-string", MultiHeadAttention, dict(dim=64, heads=8, qkv_bias="yes"), TypeError, "qkv_bias='yes'"),
    ("backend-unknown", MultiHeadAttention, dict(dim=64, heads=8, backend="fast"), ValueError, "backend='fast'"),
    ("pattern-int", MultiHeadAttention, dict(dim=64, heads=8, pattern=42), TypeError, "pattern=42"),
    ("pattern-heads", MultiHeadAttention, dict(dim=64, heads=8, pattern=PerHead([Full(), Causal()])), ValueError,
     "2 heads but heads=8"),
    ("gqa-heads-6", GroupedQueryAttention, dict(dim=60, heads=6), ValueError, "heads=6"),
    ("mqa-kv-2", MultiQueryAttention, dict(dim=64, heads=8, kv_heads=2), ValueError, "kv_heads=2"),
]


@pytest.mark.parametrize("cls, kwargs, error, fragment", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_argument_and_value(cls, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        cls(**kwargs)


def test_backend_error_lists_valid_backends():
    with pytest.raises(ValueError, match="'reference'"):
        MultiHeadAttention(64, 8, backend="fast")


BAD_INPUTS = [
    ("x-2d", lambda m: m(torch.randn(5, 32)), ValueError, "x.shape=(5, 32)"),
    ("x-width", lambda m: m(torch.randn(2, 5, 16)), ValueError, "x.shape=(2, 5, 16)"),
    ("x-not-tensor", lambda m: m([[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("context-width", lambda m: m(torch.randn(2, 5, 32), torch.randn(2, 3, 8)), ValueError, "context.shape=(2, 3, 8)"),
    ("context-batch", lambda m: m(torch.randn(2, 5, 32), torch.randn(3, 3, 32)), ValueError, "context.shape=(3, 3, 32)"),
    ("kpm-float", lambda m: m(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 5)), TypeError, "torch.float32"),
    ("kpm-shape", lambda m: m(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)),
     ValueError, "key_padding_mask.shape=(2, 4)"),
    ("kpm-self-vs-cross", lambda m: m(torch.randn(2, 5, 32), torch.randn(2, 3, 32),
                                      key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
     ValueError, "[B, M] = [2, 3]"),
]


@pytest.mark.parametrize("call, error, fragment", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_argument_and_value(call, error, fragment):
    m = MultiHeadAttention(32, 4)
    with pytest.raises(error, match=re.escape(fragment)):
        call(m)


def test_causal_flag_is_the_causal_pattern():
    torch.manual_seed(0)
    flag = MultiHeadAttention(32, 4, causal=True).to(F64)
    pattern = MultiHeadAttention(32, 4, pattern=Causal()).to(F64)
    pattern.load_state_dict(flag.state_dict())
    x = torch.randn(2, 11, 32, dtype=F64)
    assert flag.pattern == Causal()
    torch.testing.assert_close(flag(x), pattern(x), rtol=0, atol=0)
    window = MultiHeadAttention(32, 4, pattern="window(window=5)", causal=True)
    assert window.pattern == headwise.patterns.from_spec("window(window=5)") & Causal()


def test_checkpoint_with_fused_kv_projection_loads():
    """Checkpoints written before k_proj / v_proj were split (one ``kv_proj``) load into the same weights."""
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, kv_heads=2).to(F64)
    old = fused_checkpoint(m.state_dict())
    fresh = MultiHeadAttention(32, 4, kv_heads=2).to(F64)
    x = torch.randn(2, 9, 32, dtype=F64)
    assert_loads_old_checkpoint(fresh, old, m, x)
    nested = torch.nn.Sequential(MultiHeadAttention(32, 4, kv_heads=2).to(F64))
    nested.load_state_dict({f"0.{'mha.' if k.startswith(('q', 'kv')) else ''}{k}": v for k, v in old.items()})
    torch.testing.assert_close(nested(x), m(x), rtol=0, atol=0)
