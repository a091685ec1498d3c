"""M3's memory attention against the attention written out head by head
(:func:`headwise.variants.memory_attention.naive_memory_attention`), its convex combination of entries, and errors."""

import pytest
import torch

import headwise
from headwise.variants.memory_attention import MemoryAttention, naive_memory_attention
from common import F64, assert_all_params_get_grads, assert_same_forward_and_grads, rand


@pytest.mark.parametrize("heads,S,N", [(1, 1, 1), (1, 30, 63), (4, 17, 20)], ids=lambda v: str(v))
def test_memory_attention_matches_written_out(heads, S, N):
    torch.manual_seed(0)
    m = MemoryAttention(6, 16, heads=heads).double()
    x, memory = rand(2, N, 6, requires_grad=True), rand(S, 16, seed=1, requires_grad=True)
    out = m(x, memory)
    assert_same_forward_and_grads(out, naive_memory_attention(m, x, memory), [x, memory, *m.parameters()], seed=3)
    torch.testing.assert_close(m(x, memory.expand(2, S, 16)), out)


def test_learned_memory_bank_matches_written_out():
    torch.manual_seed(0)
    m = MemoryAttention(6, 8, heads=2, entries=11).double()
    x = rand(2, 63, 6)
    torch.testing.assert_close(m(x), naive_memory_attention(m, x), rtol=1e-10, atol=1e-10)
    assert m.caps.inputs == () and MemoryAttention(6, 8).caps.inputs == ("memory",)


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
