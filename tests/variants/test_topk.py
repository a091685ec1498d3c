"""topk module (headwise.variants.topk): full cover is multi-head attention, cross-attention, attention weights,
checkpoints of the former ``mha.*`` layout, errors."""

import re

import pytest
import torch

import headwise
from headwise.ops.topk import topk_attention
from headwise.variants.mha import MultiHeadAttention
from headwise.variants.topk import TopKAttention
from common import TOL, assert_loads_old_checkpoint, fused_checkpoint, rand


def test_topk_module_covering_everything_is_mha():
    torch.manual_seed(0)
    m = headwise.create("topk(topk=100, causal=True)", dim=16, heads=4, kv_heads=2).double()
    ref = MultiHeadAttention(16, 4, kv_heads=2, causal=True).double()
    ref.load_state_dict(m.state_dict())
    x = rand(2, 23, 16)
    torch.testing.assert_close(m(x), ref(x), **TOL)
    m = TopKAttention(16, 4, topk=3).double()
    assert m(x, rand(2, 9, 16, seed=1)).shape == (2, 23, 16)  # cross-attention to 9 tokens


def test_topk_module_is_projections_and_topk_attention():
    torch.manual_seed(0)
    m = TopKAttention(16, 4, kv_heads=2, topk=3).double()
    x, c = rand(2, 23, 16), rand(2, 9, 16, seed=1)
    q, k, v = m.project(x, c)
    torch.testing.assert_close(m(x, c), m.finish(topk_attention(q, k, v, 3)), **TOL)


def test_attention_weights_reproduce_the_head_outputs_with_a_context():
    torch.manual_seed(0)
    m = TopKAttention(16, 4, kv_heads=2, topk=3).double()
    x, c = rand(2, 11, 16), rand(2, 9, 16, seed=1)
    w = m.attention_weights(x, c)  # (B, H, N, M)
    assert w.shape == (2, 4, 11, 9)
    _, _, v = m.project(x, c)
    torch.testing.assert_close(w @ v.repeat_interleave(2, 1), m.attend(*m.project(x, c)), **TOL)
    assert ((w > 0).sum(-1) == 3).all()


def test_capabilities_drop_the_context_when_causal():
    assert TopKAttention(16, 2).caps.context and not TopKAttention(16, 2, causal=True).caps.context


@pytest.mark.parametrize("fused", [True, False], ids=["kv_proj", "k_proj"])
def test_old_checkpoint_with_mha_keys_loads(fused):
    """Checkpoints of the former layout (the projections inside ``self.mha``: ``mha.q_proj``, ``mha.kv_proj`` or
    ``mha.k_proj``/``mha.v_proj``, ``mha.out_proj``) load through the base's hook."""
    torch.manual_seed(0)
    m = TopKAttention(16, 4, kv_heads=2, topk=3).double()
    new = m.state_dict()
    old = fused_checkpoint(new, prefix="mha.") if fused else {f"mha.{key}": value for key, value in new.items()}
    layers = {"mha.q_proj", "mha.out_proj"} | ({"mha.kv_proj"} if fused else {"mha.k_proj", "mha.v_proj"})
    assert {key.rsplit(".", 1)[0] for key in old} == layers
    torch.manual_seed(1)
    loaded = TopKAttention(16, 4, kv_heads=2, topk=3).double()
    assert_loads_old_checkpoint(loaded, old, m, rand(2, 13, 16))


@pytest.mark.parametrize(
    "call, error, fragment",
    [
        (lambda: headwise.create("topk(causal='yes')", dim=16, heads=2), ValueError, "causal must be a bool, got causal='yes'"),
        (lambda: headwise.create("topk(topk=0)", dim=16, heads=2), ValueError, "topk must be a positive int, got topk=0"),
        (lambda: TopKAttention(16, 2, causal=True)(torch.zeros(1, 5, 16), torch.zeros(1, 4, 16)), ValueError,
         "causal attention needs as many queries as keys"),
    ],
    ids=["spec-causal", "spec-topk", "causal-context"],
)
def test_bad_configs_raise_clear_errors(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        call()
