"""DCAL's pair-wise cross-attention against naive_mha (the same weights, float64) over the concatenated keys."""

import pytest
import torch

from headwise.variants.mha import naive_mha
from headwise.variants.pwca import PairwiseCrossAttention
from common import assert_all_params_get_grads, rand


def test_pwca_without_pair_and_with_itself_is_self_attention():
    torch.manual_seed(0)
    m = PairwiseCrossAttention(16, 4).double()
    x = rand(2, 13, 16)
    ref = naive_mha(m, x, x)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, pair=x), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("N,M,kv_heads", [(1, 1, 2), (13, 7, 1), (63, 64, 2)], ids=lambda v: str(v))
def test_pwca_attends_to_concatenated_keys(N, M, kv_heads):
    torch.manual_seed(0)
    m = PairwiseCrossAttention(8, 2, kv_heads=kv_heads).double()
    x, pair = rand(2, N, 8), rand(2, M, 8, seed=1)
    out = m(x, pair=pair)
    torch.testing.assert_close(out, naive_mha(m, x, torch.cat([x, pair], 1)), rtol=1e-10, atol=1e-10)
    assert_all_params_get_grads(m, [out])


def test_pwca_causal_never_sees_the_pair():
    """causal=True masks keys after the query's position: the pair's keys (positions >= N) are never read."""
    torch.manual_seed(0)
    m = PairwiseCrossAttention(8, 2, causal=True).double()
    x, pair = rand(2, 9, 8), rand(2, 5, 8, seed=1)
    torch.testing.assert_close(m(x, pair=pair), naive_mha(m, x), rtol=1e-10, atol=1e-10)


def test_pwca_bad_pair():
    with pytest.raises(ValueError, match=r"pair must be \[B, N, C\] with C = dim = 8"):
        PairwiseCrossAttention(8, 2)(torch.randn(2, 5, 8), pair=torch.randn(2, 5, 4))
