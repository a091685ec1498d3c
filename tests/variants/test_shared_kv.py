"""DiTCtrl / IR-Diffusion region-masked key/value sharing against naive_mha and the per-query loop
naive_region_attention (the same weights, float64)."""

import pytest
import torch

from headwise.variants.mha import naive_mha
from headwise.variants.shared_kv import SharedKVAttention, naive_region_attention
from common import assert_all_params_get_grads, rand


def test_shared_kv_without_regions_is_cross_attention_to_the_reference():
    torch.manual_seed(0)
    m = SharedKVAttention(16, 4).double()
    x, ref = rand(2, 9, 16), rand(2, 11, 16, seed=1)
    torch.testing.assert_close(m(x, ref), naive_mha(m, x, ref), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x), naive_mha(m, x, x), rtol=1e-10, atol=1e-10)
    one = torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, 11, dtype=torch.long)
    torch.testing.assert_close(m(x, ref, query_regions=one[0], key_regions=one[1]), m(x, ref), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,M,R,kv_heads", [(1, 1, 1, 2), (9, 11, 2, 2), (20, 17, 3, 1)], ids=lambda v: str(v))
def test_shared_kv_regions_match_masked_loop(N, M, R, kv_heads):
    torch.manual_seed(0)
    m = SharedKVAttention(8, 2, kv_heads=kv_heads).double()
    x, ref = rand(2, N, 8), rand(2, M, 8, seed=1)
    g = torch.Generator().manual_seed(3)
    q_regions = torch.randint(0, R + 1, (2, N), generator=g)  # label R may be absent from the reference
    k_regions = torch.randint(0, R, (2, M), generator=g)
    out = m(x, ref, query_regions=q_regions, key_regions=k_regions)
    torch.testing.assert_close(out, naive_region_attention(m, x, ref, q_regions, k_regions), rtol=1e-10, atol=1e-10)
    if M > 1:  # with a single key the softmax is constant and q_proj rightly gets no gradient
        assert_all_params_get_grads(m, [out])


def test_shared_kv_errors():
    m = SharedKVAttention(8, 2)
    x = torch.randn(2, 5, 8)
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="need a reference pass"):
        m(x, query_regions=labels, key_regions=labels)
    with pytest.raises(ValueError, match="pass both query_regions"):
        m(x, x, query_regions=labels)
    with pytest.raises(ValueError, match=r"key_regions must be an integer tensor \[B, M\] = \[2, 5\]"):
        m(x, x, query_regions=labels, key_regions=labels.float())
