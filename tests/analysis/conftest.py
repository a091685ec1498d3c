"""A tiny causal LM made of headwise ``mha`` modules, shared by the analysis tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import headwise


class TinyLM(nn.Module):
    """Embedding + learned positions, ``layers`` pre-norm blocks (``mha`` with a causal pattern, MLP), a head."""

    def __init__(self, vocab: int = 12, dim: int = 32, heads: int = 4, layers: int = 2, n: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(n, dim) * 0.1)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.norm = nn.LayerNorm(dim)
            block.attn = headwise.create("mha(pattern='causal')", dim=dim, heads=heads)
            block.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.blocks.append(block)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):  # (B, N) -> (B, N, vocab)
        x = self.emb(tokens) + self.pos[: tokens.shape[1]]
        for b in self.blocks:
            x = x + b.attn(b.norm(x))
            x = x + b.mlp(x)
        return self.head(x)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP spin-waits on a shared, loaded machine
    (a 16-wide forward took ~90 ms with 2 threads under load, 0.5 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return TinyLM().eval()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 12, (3, 16), generator=g)
