"""Set attention (Distribution Transformer layer, OAT object positions) and M3's memory attention against float64
computations written out here, plus their permutation symmetries."""

import math

import pytest
import torch
import torch.nn.functional as F

import headwise
from headwise.variants.sets import MemoryAttention, SetAttention, object_positional_encoding

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_all_params_get_grads(module, out):
    loss = (out * rand(*out.shape, seed=1, dtype=out.dtype)).sum()
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, _), g in zip(params.items(), grads):
        assert g is not None, f"{name} got no gradient"
        assert torch.isfinite(g).all() and g.abs().max() > 0, f"{name} has a zero or non-finite gradient"


def naive_mha(m, x, c):
    B, N, _ = x.shape
    M = c.shape[1]
    H, D = m.heads, m.head_dim
    w_k, w_v = m.kv_proj.weight.chunk(2)
    b_k, b_v = m.kv_proj.bias.chunk(2)
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, N, H, D).transpose(1, 2)
    k = F.linear(c, w_k, b_k).view(B, M, H, D).transpose(1, 2)
    v = F.linear(c, w_v, b_v).view(B, M, H, D).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
    return F.linear((p @ v).transpose(1, 2).reshape(B, N, H * D), m.out_proj.weight, m.out_proj.bias)


def ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias)


def naive_set_attention(m, z, data=None):
    z = z + naive_mha(m.self_attn, ln(m.norm_self, z), ln(m.norm_self, z))
    if data is not None:
        z = z + naive_mha(m.cross_attn, ln(m.norm_cross, z), ln(m.norm_data, data))
    h = F.gelu(F.linear(ln(m.norm_mlp, z), m.mlp[0].weight, m.mlp[0].bias))
    return z + F.linear(h, m.mlp[2].weight, m.mlp[2].bias)


# ---------------------------------------------------------------------------------------------- set_attention


@pytest.mark.parametrize("K,M", [(1, 1), (8, 63), (5, 100)], ids=lambda v: str(v))
def test_set_attention_matches_written_out_layer(K, M):
    torch.manual_seed(0)
    m = SetAttention(16, 4).double()
    z, data = rand(2, K, 16), rand(2, M, 16, seed=1)
    torch.testing.assert_close(m(z, data), naive_set_attention(m, z, data), rtol=1e-10, atol=1e-10)
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
    out = m(z, data, positions=pos, data_positions=dpos)
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
    with pytest.raises(ValueError, match="data_positions given without data"):
        m(torch.randn(2, 4, 8), data_positions=torch.randn(2, 3, 2))


# ------------------------------------------------------------------------------------------- memory_attention


def naive_memory_attention(m, x, memory):
    B, N, _ = x.shape
    H, D, Cm = m.config.heads, m.config.head_dim, m.config.memory_dim
    outs = []
    for h in range(H):
        q = F.linear(x, m.q_proj.weight[h * D:(h + 1) * D], m.q_proj.bias[h * D:(h + 1) * D])  # (B, N, D)
        k = memory @ m.k_proj.weight[h * D:(h + 1) * D].T  # (S, D)
        p = torch.softmax(q @ k.T / math.sqrt(D), dim=-1)  # (B, N, S)
        outs.append(p @ memory[:, h * Cm // H:(h + 1) * Cm // H])  # (B, N, Cm/H)
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("heads,S,N", [(1, 1, 1), (1, 30, 63), (4, 17, 20)], ids=lambda v: str(v))
def test_memory_attention_matches_written_out(heads, S, N):
    torch.manual_seed(0)
    m = MemoryAttention(6, 16, heads=heads).double()
    x, memory = rand(2, N, 6), rand(S, 16, seed=1)
    out = m(x, memory)
    torch.testing.assert_close(out, naive_memory_attention(m, x, memory), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(x, memory.expand(2, S, 16)), out)


def test_memory_attention_output_is_a_convex_combination_of_entries():
    m = MemoryAttention(4, 5).double()
    x = rand(3, 7, 4)
    single = rand(1, 5, seed=2)
    torch.testing.assert_close(m(x, single), single.expand(3, 7, 5))  # one entry: always that entry
    weights = m(x, torch.eye(5, dtype=F64))  # identity memory: the output is the attention distribution
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 7, dtype=F64))


def test_memory_attention_learned_bank_grads_and_errors():
    m = headwise.create("memory_attention(memory_dim=8, entries=12, heads=2)", dim=4)
    assert_all_params_get_grads(m, m(torch.randn(2, 9, 4)))
    with pytest.raises(ValueError, match="needs a memory"):
        MemoryAttention(4, 8)(torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match="memory_dim must be divisible by heads, got memory_dim=8 heads=3"):
        MemoryAttention(4, 8, heads=3)
    with pytest.raises(ValueError, match=r"memory must be \[S, C_m\] or \[B, S, C_m\] with C_m = memory_dim = 8"):
        MemoryAttention(4, 8)(torch.randn(2, 9, 4), torch.randn(5, 7))
    with pytest.raises(ValueError, match="must have x's batch size B=2"):
        MemoryAttention(4, 8)(torch.randn(2, 9, 4), torch.randn(3, 5, 8))
