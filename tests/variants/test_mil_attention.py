"""ACMIL's multiple-branch attention pooling against naive_gated_pooling (Ilse et al.'s gated attention pooling
written out, float64) and its stochastic top-k instance masking."""

import math

import pytest
import torch

import headwise
from headwise.variants.mil_attention import MILAttention, naive_gated_pooling
from common import assert_all_params_get_grads, rand


@pytest.mark.parametrize("N", [1, 7, 500], ids=lambda n: f"N{n}")
def test_mil_one_branch_no_masking_is_gated_attention_pooling(N):
    torch.manual_seed(0)
    m = MILAttention(6, branches=1, hidden=5, mask_topk=0).double().train()
    x = rand(2, N, 6)
    out = m(x)
    z, a = naive_gated_pooling(m, x)
    torch.testing.assert_close(out.bag, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.branches[:, 0], z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.attention[:, 0], a, rtol=1e-12, atol=1e-12)
    assert out.logits is None and out.branch_logits is None


def test_mil_branches_and_bag_are_the_branch_average():
    torch.manual_seed(0)
    m = MILAttention(6, branches=3, hidden=5).double().eval()  # eval: no masking
    x = rand(2, 11, 6)
    out = m(x)
    pooled = [naive_gated_pooling(m, x, b) for b in range(3)]
    for b, (z, a) in enumerate(pooled):
        torch.testing.assert_close(out.branches[:, b], z, rtol=1e-12, atol=1e-12)
    a_mean = torch.stack([a for _, a in pooled]).mean(0)  # (B, N)
    torch.testing.assert_close(out.bag, (a_mean[..., None] * x).sum(1), rtol=1e-12, atol=1e-12)


def test_mil_stochastic_top_k_masking():
    """Training: floor(k p) of each branch's top-k instances get zero attention, the others renormalize; the bag
    embedding still pools with the unmasked attention."""
    torch.manual_seed(0)
    m = MILAttention(6, branches=4, hidden=5, mask_topk=5, mask_ratio=0.6).double().train()
    x = rand(3, 20, 6)
    out = m(x)
    s = m.scores(x)  # (B, M, N)
    top = s.topk(5, dim=-1).indices
    masked = out.attention == 0
    assert (masked.sum(-1) == 3).all()  # floor(5 * 0.6)
    assert torch.gather(masked, -1, top).sum(-1).eq(3).all()  # only among the top 5
    torch.testing.assert_close(out.attention, torch.softmax(s.masked_fill(masked, -math.inf), -1))
    torch.testing.assert_close(out.bag, m.eval()(x).bag)


def test_mil_never_masks_every_instance():
    m = MILAttention(4, branches=2, mask_topk=10, mask_ratio=1.0).train()
    out = m(torch.randn(2, 3, 4))
    assert ((out.attention > 0).sum(-1) == 1).all()
    assert torch.isfinite(out.branches).all()


def test_mil_classifiers_grads_and_errors():
    m = headwise.create("mil_attention(classes=3, branches=2, mask_topk=2)", dim=8).train()
    out = m(torch.randn(2, 9, 8))
    assert out.logits.shape == (2, 3) and out.branch_logits.shape == (2, 2, 3)
    assert_all_params_get_grads(m, [out.logits, out.branch_logits])
    with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\], got mask_ratio=1.5"):
        MILAttention(8, mask_ratio=1.5)
    with pytest.raises(ValueError, match="mask_topk must be a non-negative int, got mask_topk=-1"):
        MILAttention(8, mask_topk=-1)
    with pytest.raises(ValueError, match=r"x must be a bag \[B, N, C\]"):
        m(torch.randn(9, 8))


def test_old_mask_top_k_keyword_still_works_and_warns():
    with pytest.warns(FutureWarning, match="mask_top_k= is renamed mask_topk="):
        m = headwise.create("mil_attention(mask_top_k=3)", dim=8)
    assert m.config.mask_topk == 3
