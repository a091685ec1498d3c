"""dma module (headwise.variants.dma): projections + value-derived bias + the dense reference, gradients to every
parameter, attention weights, renamed keywords, errors."""

import re

import pytest
import torch

import headwise
from headwise.variants.dma import DynamicMaskAttention, naive_dma
from common import F64, TOL, assert_all_params_get_grads, rand


@pytest.mark.parametrize("bias_form", ["exp", "linear"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dma_module_is_projections_bias_and_reference(bias_form, causal):
    torch.manual_seed(0)
    m = DynamicMaskAttention(32, 4, kv_heads=2, window=6, causal=causal, bias_form=bias_form, chunk=8).double()
    with torch.no_grad():
        m.A.copy_(torch.tensor([0.7, -1.3], dtype=F64))
    x = rand(2, 29, 32, seed=3)
    out = m(x)
    torch.testing.assert_close(out, naive_dma(m, x), **TOL)
    assert_all_params_get_grads(m, out, seed=11)  # A and dt_proj train through the kept scores


def test_attention_weights_take_the_bias_from_the_real_values():
    torch.manual_seed(0)
    m = DynamicMaskAttention(16, 4, kv_heads=2, window=5, chunk=4).double()
    x = rand(2, 17, 16, seed=2)
    w = m.attention_weights(x)  # (B, H, N, N)
    q, k, v = m.project(x)
    torch.testing.assert_close(w @ v.repeat_interleave(2, 1), m.attend(q, k, v), **TOL)
    assert torch.all(w.triu(1) == 0) and ((w > 0).sum(-1) <= 5).all()


@pytest.mark.parametrize("old, new, value", [("block", "chunk", 8), ("bias", "bias_form", "linear")])
def test_renamed_keywords_still_work_and_warn(old, new, value):
    with pytest.warns(FutureWarning, match=f"{old}= is renamed {new}="):
        m = headwise.create(f"dma({old}={value!r})", dim=16, heads=2)
    assert getattr(m.config, new) == value
    with pytest.warns(FutureWarning):
        assert getattr(DynamicMaskAttention(16, 2, **{old: value}).config, new) == value


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: DynamicMaskAttention(16, 2, bias_form="sigmoid"), ValueError, "bias_form must be one of 'exp', 'linear', got bias_form='sigmoid'"),
        (lambda: headwise.create("dma(window=0)", dim=16, heads=2), ValueError, "window must be a positive int, got window=0"),
        (lambda: headwise.create("dma(chunk=0)", dim=16, heads=2), ValueError, "chunk must be a positive int, got chunk=0"),
        (lambda: DynamicMaskAttention(15, 2), ValueError, "dim must be divisible by heads"),
    ],
    ids=["bias-form", "spec-window", "spec-chunk", "dim"],
)
def test_bad_configs_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()
