"""DCAL's global-local cross-attention and attention rollout against naive_mha with the same weights and
float64 computations written out here."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.ops.selection.tokens import attention_rollout
from headwise.variants.glca import GlobalLocalCrossAttention
from headwise.variants.mha import naive_mha
from common import F64, assert_all_params_get_grads, fused_checkpoint, rand


def test_attention_rollout_by_hand():
    a1 = torch.softmax(rand(2, 3, 5, 5, seed=1), -1)
    a2 = torch.softmax(rand(2, 3, 5, 5, seed=2), -1)
    eye = torch.eye(5, dtype=F64)
    ref = (0.5 * a2.mean(1) + 0.5 * eye) @ (0.5 * a1.mean(1) + 0.5 * eye)
    torch.testing.assert_close(attention_rollout([a1, a2]), ref)
    torch.testing.assert_close(attention_rollout([a1, a2]).sum(-1), torch.ones(2, 5, dtype=F64))  # stays stochastic
    with pytest.raises(ValueError, match="at least one attention map"):
        attention_rollout([])


@pytest.mark.parametrize("N", [1, 17, 63], ids=lambda n: f"N{n}")
def test_glca_full_ratio_is_self_attention(N):
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(16, 4, local_ratio=1.0).double()
    x = rand(2, N, 16)
    out, idx = m(x, scores=rand(2, N, seed=4))
    back = torch.empty_like(out).scatter(1, idx[..., None].expand_as(out), out)  # original token order
    torch.testing.assert_close(back, naive_mha(m, x, x, pattern=None), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=lambda k: f"kv{k}")
def test_glca_selects_top_r_tokens_as_queries(kv_heads):
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(8, 2, kv_heads=kv_heads, local_ratio=0.2).double()
    x = rand(3, 21, 8)
    scores = rand(3, 21, seed=5)
    out, idx = m(x, scores=scores)
    R = math.ceil(0.2 * 21)
    assert idx.shape == (3, R) and out.shape == (3, R, 8)
    assert torch.equal(idx, scores.argsort(-1, descending=True)[:, :R])
    local = torch.stack([x[b, idx[b]] for b in range(3)])
    torch.testing.assert_close(out, naive_mha(m, local, x, pattern=None), rtol=1e-10, atol=1e-10)


def test_glca_default_scores_are_its_own_cls_rollout():
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(8, 2, local_ratio=0.5).double()
    x = rand(2, 9, 8)
    B, N, H, D = 2, 9, 2, 4
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(B, N, H, D).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)  # (B, H, N, N)
    expected = attention_rollout([a])[:, 0]  # (B, N) class-token row
    torch.testing.assert_close(m.cls_rollout(x), expected, rtol=1e-12, atol=1e-12)
    _, idx = m(x)
    assert torch.equal(idx, expected.topk(5, -1).indices)


def test_glca_loads_kv_proj_checkpoints():
    torch.manual_seed(0)
    m = GlobalLocalCrossAttention(8, 2, local_ratio=0.5).double()
    fresh = GlobalLocalCrossAttention(8, 2, local_ratio=0.5).double()
    fresh.load_state_dict(fused_checkpoint(m.state_dict()))
    x = rand(2, 9, 8)
    torch.testing.assert_close(fresh(x)[0], m(x)[0], rtol=0, atol=0)


def test_glca_grads_and_errors():
    m = headwise.create("glca(local_ratio=0.5)", dim=8, heads=2)
    out, _ = m(torch.randn(2, 10, 8))
    assert_all_params_get_grads(m, [out])
    with pytest.raises(ValueError, match=r"local_ratio must be a number in \(0, 1\], got local_ratio=0"):
        GlobalLocalCrossAttention(8, 2, local_ratio=0)
    with pytest.raises(ValueError, match=r"scores must be a tensor \[B, N\]"):
        m(torch.randn(2, 10, 8), scores=torch.rand(2, 9))
