"""RestoreFormer++'s dictionary cross-attention against MultiHeadAttention and naive_mha with the same weights
(float64), the dictionary as the context."""

import pytest
import torch

import headwise
from headwise.variants.dictionary_cross import DictionaryCrossAttention
from headwise.variants.mha import naive_mha
from common import assert_all_params_get_grads, assert_loads_old_checkpoint, fused_checkpoint, mha_like, rand


@pytest.mark.parametrize("N,S,kv_heads", [(1, 1, 4), (17, 32, 2), (63, 5, 1)], ids=lambda v: str(v))
def test_dictionary_cross_is_mha_to_the_dictionary(N, S, kv_heads):
    torch.manual_seed(0)
    m = DictionaryCrossAttention(16, 4, kv_heads=kv_heads, entries=S).double()
    x = rand(2, N, 16)
    ref = mha_like(m)
    torch.testing.assert_close(m(x), ref(x, m.dictionary.expand(2, S, 16)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x), naive_mha(m, x, m.dictionary.expand(2, S, 16), pattern=None),
                               rtol=1e-10, atol=1e-10)


def test_dictionary_cross_multiscale_list_and_grads():
    m = headwise.create("dictionary_cross(entries=8)", dim=8, heads=2)
    feats = [torch.randn(2, 64, 8), torch.randn(2, 16, 8), torch.randn(2, 4, 8)]
    outs = m(feats)
    assert [o.shape for o in outs] == [f.shape for f in feats]
    torch.testing.assert_close(outs[1], m(feats[1]))
    assert_all_params_get_grads(m, outs)
    with pytest.raises(ValueError, match="entries must be a positive int, got entries=0"):
        DictionaryCrossAttention(8, 2, entries=0)


def test_dictionary_cross_output_token_reads_only_its_own_input():
    """Causal by construction: changing token t changes output t only."""
    torch.manual_seed(0)
    m = DictionaryCrossAttention(8, 2, entries=6).double()
    x = rand(1, 9, 8)
    x2 = x.clone()
    x2[:, 4] += 1.0
    y, y2 = m(x), m(x2)
    changed = (y - y2).abs().amax(-1)[0] > 0  # (N,)
    assert changed.tolist() == [i == 4 for i in range(9)]


def test_dictionary_cross_loads_kv_proj_checkpoints():
    torch.manual_seed(0)
    m = DictionaryCrossAttention(8, 2, entries=6).double()
    fresh = DictionaryCrossAttention(8, 2, entries=6).double()
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict()), m, rand(2, 9, 8))
