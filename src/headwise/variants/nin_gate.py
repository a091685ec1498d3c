"""NiNformer's mixer-gated unit (registered as ``"nin_gate"``).

Abdullah and Aydin, 2024, "NiNformer: A Network in Network Transformer with Token Mixing Generated Gating
Function": the attention sub-layer of a ViT block becomes a linear map gated element-wise by an inner
MLP-Mixer block. The token MLP is sized for one sequence length (config field ``tokens``). No attention matrix.
The reference, the equations written out with the module's weights, is :func:`naive_nin_gate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_number, check_positive_int, check_tokens
from headwise.variants.base import Capabilities, Variant
from headwise.variants.registry import register

__all__ = ["MixerGatingUnit", "naive_nin_gate"]


class _FeedForward(nn.Sequential):
    """Linear -> GELU -> dropout -> Linear -> dropout (the MLP of ViT and MLP-Mixer)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


@register("nin_gate")
class MixerGatingUnit(Variant):
    r"""NiNformer's network-in-network token mixer, from "NiNformer: A Network in Network Transformer with Token
    Mixing Generated Gating Function" (Abdullah and Aydin, 2024): the attention sub-layer of a ViT block is
    replaced by a linear map gated element-wise by an inner MLP-Mixer block.

    .. math::

        u = x W + b, \qquad
        z = x + \mathrm{MLP}_{tok}(\mathrm{LN}_1(x)^\top)^\top, \qquad
        g = z + \mathrm{MLP}_{ch}(\mathrm{LN}_2(z)), \qquad
        y = u \odot g

    ``MLP_tok`` mixes the ``N`` tokens (``N -> token_hidden -> N``, shared across channels) and ``MLP_ch`` the
    channels (``C -> channel_hidden -> C``); both are Linear-GELU-Linear. The gate ``g`` depends on the whole
    input, which is the "dynamic" gating that distinguishes NiNformer from a static MLP-Mixer. The NiNformer
    block is ``x + nin_gate(LN(x))`` followed by ``x + MLP(LN(x))``.

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]`` with ``N = tokens`` fixed at construction (the token MLP's width).

    Args:
        dim: channels ``C``.
        tokens: number of tokens ``N``.
        token_hidden: hidden width of the token-mixing MLP (default ``4 * dim``).
        channel_hidden: hidden width of the channel-mixing MLP (default ``4 * dim``).
        dropout: dropout inside both MLPs, in ``[0, 1)`` (default 0).

    Choices made here: the default hidden widths follow the authors' code, which passes one ``d_ffn`` to both
    MLPs; we take ``4 * dim`` for it. The gate has no sigmoid (the paper's element-wise product of the two
    branches). The token MLP is dense over the ``N`` tokens: no causal mode, and no attention matrix for
    ``inspect``.

    Example:
        >>> import torch, headwise
        >>> headwise.create("nin_gate(tokens=64)", dim=32)(torch.randn(2, 64, 32)).shape
        torch.Size([2, 64, 32])
    """

    capabilities = Capabilities(tokens=True, weights="none")
    example_config = {"dim": 16, "tokens": 7, "token_hidden": 8, "channel_hidden": 12}

    @dataclass
    class Config:
        dim: int  # channels C of the tokens [B, N, C]
        tokens: int  # number of tokens N (the token-mixing MLP acts on this axis)
        token_hidden: int | None = None  # hidden width of the token-mixing MLP; None: 4 * dim
        channel_hidden: int | None = None  # hidden width of the channel-mixing MLP; None: 4 * dim
        dropout: float = 0.0  # dropout inside both MLPs, in [0, 1)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("tokens", self.tokens)
            if self.token_hidden is None:
                self.token_hidden = 4 * self.dim
            if self.channel_hidden is None:
                self.channel_hidden = 4 * self.dim
            check_positive_int("token_hidden", self.token_hidden)
            check_positive_int("channel_hidden", self.channel_hidden)
            self.dropout = check_number("dropout", self.dropout, 0, 1, high_open=True)

    def build(self, cfg) -> None:
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.token_norm = nn.LayerNorm(cfg.dim)
        self.token_mlp = _FeedForward(cfg.tokens, cfg.token_hidden, cfg.dropout)
        self.channel_norm = nn.LayerNorm(cfg.dim)
        self.channel_mlp = _FeedForward(cfg.dim, cfg.channel_hidden, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, N, C]`` (``N = tokens``) -> ``[B, N, C]``."""
        check_tokens("x", x, self.config.dim, tokens=self.config.tokens)
        u = self.proj(x)  # (B, N, C)
        z = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        g = z + self.channel_mlp(self.channel_norm(z))  # (B, N, C)
        return u * g  # (B, N, C)


def naive_nin_gate(m: MixerGatingUnit, x: Tensor) -> Tensor:
    """Reference of :class:`MixerGatingUnit` with its own weights: ``u * g`` with the mixer written out (LN,
    token MLP on the transposed tokens, residual, LN, channel MLP). No dropout (compare in ``eval()`` mode)."""
    def mlp(seq: nn.Sequential, t: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(t, seq[0].weight, seq[0].bias)), seq[3].weight, seq[3].bias)

    C = x.shape[-1]
    u = F.linear(x, m.proj.weight, m.proj.bias)  # (B, N, C)
    t = F.layer_norm(x, (C,), m.token_norm.weight, m.token_norm.bias)  # (B, N, C)
    z = x + mlp(m.token_mlp, t.transpose(1, 2)).transpose(1, 2)  # (B, N, C)
    c = F.layer_norm(z, (C,), m.channel_norm.weight, m.channel_norm.bias)  # (B, N, C)
    return u * (z + mlp(m.channel_mlp, c))  # (B, N, C)
