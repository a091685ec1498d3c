"""sparsifiner module (headwise.variants.sparsifiner): attention over the predicted budget against attention
written out row by row, full budget is multi-head attention, the distillation loss, errors."""

import math
import re

import pytest
import torch

from headwise.ops.selection.tokens import topk_mask
from headwise.ops.topk import rowwise_attention
from headwise.variants.mha import MultiHeadAttention
from headwise.variants.sparsifiner import Sparsifiner
from common import F64, TOL, rand


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
    assert (rows.sum(-1) == math.ceil(0.2 * 21)).all() and m.budget == 5
    assert mask[:, :, 0].all() == cls_token
    o = rowwise_attention(q, k, v, mask)
    expected = m.out_proj(o.transpose(1, 2).reshape(2, 21, 16))
    torch.testing.assert_close(m(x), expected, **TOL)
    torch.testing.assert_close(m.attention_weights(x) @ v, o, **TOL)  # the weights reproduce the head outputs


def test_sparsifiner_full_budget_is_mha():
    m = sparsifiner(keep_rate=1.0)
    ref = MultiHeadAttention(16, 2).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k.split(".")[0] in ("q_proj", "k_proj", "v_proj",
                                                                                       "out_proj")})
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


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: Sparsifiner(16, 2), ValueError, "sparsifiner needs tokens="),
        (lambda: Sparsifiner(16, 2, tokens=8, keep_rate=0), ValueError, "keep_rate must be a number in (0, 1], got keep_rate=0"),
        (lambda: sparsifiner()(torch.zeros(1, 20, 16, dtype=F64)), ValueError, "sparsifiner is sized for tokens=21, got x.shape=(1, 20, 16)"),
        (lambda: sparsifiner().distillation_loss(torch.zeros(1, 21, 16, dtype=F64), torch.zeros(3)), ValueError, "teacher must be an attention map"),
    ],
    ids=["tokens-missing", "keep-rate", "tokens-mismatch", "teacher"],
)
def test_bad_configs_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()
