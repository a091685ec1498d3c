"""Set attention (Distribution Transformer layer, OAT object positions) against the layer written out
(:func:`headwise.variants.set_attention.naive_set_attention`, on :func:`headwise.variants.mha.naive_mha`), plus
its permutation symmetries."""

import pytest
import torch

import headwise
from headwise.variants.set_attention import SetAttention, naive_set_attention, object_positional_encoding
from common import (
    F64,
    assert_all_params_get_grads,
    assert_loads_old_checkpoint,
    assert_same_forward_and_grads,
    fused_checkpoint,
    rand,
)


@pytest.mark.parametrize("K,M", [(1, 1), (8, 63), (5, 100)], ids=lambda v: str(v))
def test_set_attention_matches_written_out_layer(K, M):
    torch.manual_seed(0)
    m = SetAttention(16, 4).double()
    z, data = rand(2, K, 16, requires_grad=True), rand(2, M, 16, seed=1, requires_grad=True)
    assert_same_forward_and_grads(m(z, data), naive_set_attention(m, z, data), [z, data, *m.parameters()], seed=3)
    torch.testing.assert_close(m(z), naive_set_attention(m, z), rtol=1e-10, atol=1e-10)


def test_set_attention_symmetries():
    """Equivariant to permuting the components, invariant to permuting the data points."""
    torch.manual_seed(0)
    m = SetAttention(8, 2).double()
    z, data = rand(1, 6, 8), rand(1, 11, 8, seed=1)
    pz, pd = torch.randperm(6), torch.randperm(11)
    out = m(z, data)
    torch.testing.assert_close(m(z[:, pz], data), out[:, pz], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(z, data[:, pd]), out, rtol=1e-12, atol=1e-12)


def test_object_positional_encoding_values_and_relative_property():
    pos = torch.tensor([[0.5, 2.0]], dtype=F64)
    pe = object_positional_encoding(pos, 8)  # 2 coords x (2 sin + 2 cos)
    freqs = torch.tensor([1.0, 10000 ** -0.5], dtype=F64)
    expected = torch.cat([torch.sin(0.5 * freqs), torch.cos(0.5 * freqs), torch.sin(2.0 * freqs), torch.cos(2.0 * freqs)])
    torch.testing.assert_close(pe[0], expected)
    a, b = rand(1, 2), rand(1, 2, seed=1)
    shift = torch.tensor([[0.7, -1.3]], dtype=F64)
    dot = (object_positional_encoding(a, 16) * object_positional_encoding(b, 16)).sum()
    dot_shifted = (object_positional_encoding(a + shift, 16) * object_positional_encoding(b + shift, 16)).sum()
    torch.testing.assert_close(dot, dot_shifted)  # depends only on coordinate differences
    with pytest.raises(ValueError, match="dim must be divisible by 2 \\* P = 4 for P=2 coordinates, got dim=6"):
        object_positional_encoding(a, 6)


def test_set_attention_positions_are_added_before_the_layer():
    torch.manual_seed(0)
    m = SetAttention(8, 2).double()
    z, data = rand(2, 5, 8), rand(2, 7, 8, seed=1)
    pos, dpos = rand(2, 5, 2, seed=2), rand(2, 7, 2, seed=3)
    out = m(z, data, positions=pos, context_positions=dpos)
    ref = m(z + object_positional_encoding(pos, 8), data + object_positional_encoding(dpos, 8))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # with positions, permuting objects together with their positions still permutes the output
    p = torch.randperm(5)
    torch.testing.assert_close(m(z[:, p], data, positions=pos[:, p]), m(z, data, positions=pos)[:, p])


def test_set_attention_grads_and_errors():
    m = headwise.create("set_attention(mlp_ratio=2)", dim=8, heads=2)
    assert_all_params_get_grads(m, m(torch.randn(2, 4, 8), torch.randn(2, 9, 8)))
    with pytest.raises(ValueError, match="mlp_ratio must be a positive number"):
        SetAttention(8, 2, mlp_ratio=0)
    with pytest.raises(ValueError, match="dim must be divisible by heads"):
        SetAttention(10, 4)
    with pytest.raises(ValueError, match=r"positions must be \[B, K, P\]"):
        m(torch.randn(2, 4, 8), positions=torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match="context_positions given without context"):
        m(torch.randn(2, 4, 8), context_positions=torch.randn(2, 3, 2))


def test_old_forward_keywords_data_and_data_positions_still_work_and_warn():
    torch.manual_seed(0)
    m = SetAttention(8, 2).double()
    z, data, dpos = rand(2, 5, 8), rand(2, 7, 8, seed=1), rand(2, 7, 2, seed=3)
    with pytest.warns(FutureWarning, match="data= is renamed context="):
        old = m(z, data=data)
    torch.testing.assert_close(old, m(z, data), rtol=0, atol=0)
    with pytest.warns(FutureWarning, match="data_positions= is renamed context_positions="):
        old = m(z, data, data_positions=dpos)
    torch.testing.assert_close(old, m(z, data, context_positions=dpos), rtol=0, atol=0)
    with pytest.raises(ValueError, match="give only the new"):
        m(z, data, data=data)


def test_checkpoints_with_fused_kv_projections_still_load():
    """Before v2 each attention had a fused ``kv_proj``; those keys load into ``k_proj`` and ``v_proj``."""
    torch.manual_seed(0)
    m = SetAttention(8, 2).double()
    fresh = SetAttention(8, 2).double()
    old = fused_checkpoint(m.state_dict(), within=("self_attn", "cross_attn"))
    assert_loads_old_checkpoint(fresh, old, m, rand(2, 5, 8), rand(2, 7, 8, seed=1))
