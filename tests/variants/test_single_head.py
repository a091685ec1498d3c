"""Single-head attention (SHViT) against its reference written out with the module's weights (float64)."""

import pytest
import torch

import headwise
from headwise.patterns import Causal, Full, PerHead
from headwise.variants.single_head import SingleHeadAttention, naive_single_head
from common import F64, assert_same_forward_and_grads


@pytest.mark.parametrize("partial, pattern, norm", [(0.25, None, "group"), (1.0, Causal(), "layer"), (0.3, None, "layer")],
                         ids=["p0.25", "p1-causal-layer", "p0.3-layer"])
def test_single_head_matches_naive(partial, pattern, norm):
    torch.manual_seed(0)
    m = SingleHeadAttention(40, partial=partial, qk_dim=8, pattern=pattern, norm=norm).to(F64)
    assert m.pdim == round(partial * 40)
    with torch.no_grad():
        m.pre_norm.weight.normal_(), m.pre_norm.bias.normal_()
    x = torch.randn(3, 23, 40, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_single_head(m, x), [x] + list(m.parameters()), allow_unused=True)


def test_single_head_causal_needs_per_token_norm():
    with pytest.raises(ValueError, match="norm='layer'"):
        SingleHeadAttention(40, pattern=Causal(), norm="group")
    with pytest.raises(ValueError, match="causal=True would still see"):
        SingleHeadAttention(40, causal=True, norm="group")
    for kw in (dict(pattern=Causal()), dict(causal=True)):  # norm="auto": per token
        torch.manual_seed(0)
        m = SingleHeadAttention(40, **kw).to(F64)
        assert m.config.norm == "layer" and m.pattern == Causal()
        x = torch.randn(2, 20, 40, dtype=F64)
        y = m(x)
        x2 = x.clone()
        x2[:, 9:] = torch.randn_like(x2[:, 9:])
        torch.testing.assert_close(m(x2)[:, :9], y[:, :9], rtol=0, atol=1e-12)
        torch.testing.assert_close(y, naive_single_head(m, x), rtol=1e-10, atol=1e-10)


def test_single_head_norm_auto_is_group_unless_causal():
    assert SingleHeadAttention(32).config.norm == "group"
    assert SingleHeadAttention(32, pattern=Causal()).config.norm == "layer"
    assert SingleHeadAttention(32, causal=True).config.norm == "layer"


def test_bias_is_renamed_qkv_bias_and_out_bias():
    with pytest.warns(FutureWarning, match=r"bias= is renamed qkv_bias= and out_bias="):
        m = headwise.create("single_head(bias=False)", dim=32)
    assert not m.config.qkv_bias and not m.config.out_bias and m.qkv.bias is None and m.proj.bias is None
    m = SingleHeadAttention(32, qkv_bias=False)
    assert m.qkv.bias is None and m.proj.bias is not None


BAD = [
    (dict(dim=64, partial=0.0), ValueError, r"partial must be a fraction in \(0, 1\]"),
    (dict(dim=64, partial=1.5), ValueError, r"partial must be a fraction in \(0, 1\]"),
    (dict(dim=64, partial=-0.2), ValueError, r"partial must be a fraction in \(0, 1\]"),
    (dict(dim=64, partial=0.001), ValueError, "leaves no channel"),
    (dict(dim=64, heads=8), ValueError, "unknown config key"),
    (dict(dim=64, norm="batch"), ValueError, "norm must be one of"),
    (dict(dim=64, causal=1), ValueError, "causal must be a bool"),  # create reports a wrong type as a bad config
    (dict(dim=64, pattern=PerHead([Full(), Full()])), ValueError, "head-specific pattern has 2 heads"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_config_raises(kw, exc, match):
    with pytest.raises(exc, match=match):
        headwise.create("single_head", **kw)
