"""Random-feature attention (registered as ``"random_features"``).

Fu, Guo, Bai and Mei, NeurIPS 2023, "What can a Single Attention Layer Learn? A Study Through the Random Features
Lens": many heads with frozen random query-key matrices (:func:`sample_query_key`) and trainable values. All
heads run as one :func:`headwise.attention` call (multi-query layout); :func:`naive_random_feature_attention`
(head by head, materialized scores) is the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.checks import check_positive_int, check_tokens
from headwise.core.attention import attention
from headwise.core.reference import naive_attention
from headwise.variants.base import Capabilities, Variant, check_backend
from headwise.variants.registry import register

__all__ = ["RandomFeatureAttention", "naive_random_feature_attention", "sample_query_key"]


def sample_query_key(heads: int, dim: int, mean: float, std: float, generator: torch.Generator | None = None) -> Tensor:
    """``heads`` random query-key matrices ``W_m = mean * I + std * G_m``, ``G_m`` i.i.d. standard normal entries;
    returns ``[heads, dim, dim]`` (float32, CPU)."""
    g = torch.randn(heads, dim, dim, generator=generator)  # (M, C, C)
    return std * g + mean * torch.eye(dim)


@register("random_features")
class RandomFeatureAttention(Variant):
    r"""A single random-feature attention layer (Fu et al., 2023): ``M`` heads whose query-key matrices are
    sampled once and frozen; only the value matrices are trained.

    The paper's layer (a query ``x_0``, keys ``x_1..x_N``, scalar output) is
    ``f(x_{0:N}) = \sum_{m=1}^{M} \sum_{i} \sigma_m(x_0, x_i) \langle v_m, x_i \rangle`` with
    ``\sigma_m(x_0, x_i) = \mathrm{softmax}_i(x_0^\top W_m x_i)`` and ``W_m`` Gaussian, frozen. Here every token
    is a query over all tokens (self-attention) and the output is a ``C``-vector, so each head's value is a
    matrix ``V_m \in \mathbb{R}^{C \times C}``:

    .. math::

        y_n = \sum_{m=1}^{M} \sum_{i=1}^{N} \mathrm{softmax}_i\big(x_n^\top W_m x_i / C\big)\, x_i^\top V_m
        \qquad W_m = \mu I + \sigma G_m,\ (G_m)_{ab} \sim \mathcal{N}(0, 1)\ \text{frozen}

    which is linear in the trainable ``V = [V_1; ...; V_M]`` (a random-feature model, as in the paper). The
    ``1/C`` puts inputs with unit-variance entries on the paper's scale (unit-norm tokens, ``x/\sqrt{C}``):
    the score's random part then has variance ``\sigma^2`` and its mean part is ``\mu \cos``-like similarity.
    ``\mu = 0`` is the paper's zero-mean case; ``\mu \neq 0`` its non-zero-mean case, which it shows learns
    some natural targets (e.g. functions of ``\langle x_0, x_i \rangle``) with fewer samples.

    Computation: one :func:`headwise.attention` call with ``M`` query heads ``q_m = x W_m / C``
    ``[B, M, N, C]`` sharing a single key head ``k = x`` and value head ``v = x`` ``[B, 1, N, C]`` (MQA layout,
    ``scale=1``); then ``y = \mathrm{Concat}_m(o_m)\, V`` with ``V`` stored as the bias-free linear layer
    ``out_proj`` ``[C, M*C]``. Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``. Cost: attention with head width
    ``C`` per head, i.e. ``C / D`` times MHA's per head.

    Args (the fields of :class:`RandomFeatureAttention.Config`):
        dim: model width ``C``.
        heads: number of random heads ``M`` (the theory wants many).
        qk_mean: ``\mu``, mean of the diagonal of ``W_m`` (default 0: zero-mean Gaussian).
        qk_std: ``\sigma``, standard deviation of every entry of ``W_m`` (default 1, must be >= 0).
        seed: seed of the frozen draw (a private generator, so the layer is reproducible without touching the
            global RNG); ``None`` (default) draws from torch's global RNG.
        backend: :func:`headwise.attention` backend (default ``"auto"``).

    The frozen ``W`` is the buffer ``query_key`` ``[M, C, C]`` (saved in the state dict, never a parameter);
    ``out_proj.weight`` is the only parameter. Choices made here: the mean is a multiple of the identity (the
    paper's non-zero-mean example; a general mean matrix is not offered); self-attention instead of one
    separate query token; no value bias.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("random_features(qk_mean=1.0, seed=0)", dim=64, heads=32)
        >>> [name for name, p in m.named_parameters()]
        ['out_proj.weight']
        >>> m(torch.randn(2, 50, 64)).shape
        torch.Size([2, 50, 64])
    """

    capabilities = Capabilities()
    example_config = {"dim": 8, "heads": 3, "qk_mean": 1.0, "seed": 0}

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of random heads M
        qk_mean: float = 0.0  # mu: W_m = mu * I + sigma * G_m
        qk_std: float = 1.0  # sigma >= 0: standard deviation of every entry of W_m
        seed: int | None = None  # seed of the frozen draw; None: torch's global RNG
        backend: str = "auto"  # headwise.attention backend

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            for name in ("qk_mean", "qk_std"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
                setattr(self, name, float(value))
            if self.qk_std < 0:
                raise ValueError(f"qk_std must be >= 0, got qk_std={self.qk_std}")
            if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
                raise TypeError(f"seed must be an int or None, got seed={self.seed!r}")
            check_backend(self.backend)

    def build(self, cfg) -> None:
        generator = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("query_key", sample_query_key(cfg.heads, cfg.dim, cfg.qk_mean, cfg.qk_std, generator))
        self.out_proj = nn.Linear(cfg.heads * cfg.dim, cfg.dim, bias=False)  # V = [V_1; ...; V_M], trainable

    def forward(self, x: Tensor) -> Tensor:
        """Random-feature attention over ``x`` ``[B, N, C]``; returns ``[B, N, C]``."""
        check_tokens("x", x, self.config.dim)
        B, N, C = x.shape
        M = self.config.heads
        w = self.query_key.permute(1, 0, 2).reshape(C, M * C)  # (C, M*C) = [W_1 ... W_M]
        q = (x @ w.to(x.dtype) / C).view(B, N, M, C).transpose(1, 2)  # (B, M, N, C)
        kv = x[:, None]  # (B, 1, N, C): keys and values are the tokens themselves
        o = attention(q, kv, kv, scale=1.0, backend=self.config.backend)  # (B, M, N, C)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, M * C))  # (B, N, C)


def naive_random_feature_attention(module: RandomFeatureAttention, x: Tensor) -> Tensor:
    """Reference for :class:`RandomFeatureAttention`, head by head: ``softmax_i(x_n^T W_m x_i / C)`` materialized
    (:func:`headwise.core.naive_attention`), values ``x``, then ``sum_m o_m V_m``. ``[B, N, C]`` -> ``[B, N, C]``."""
    B, N, C = x.shape
    M = module.config.heads
    V = module.out_proj.weight.view(C, M, C)  # (C_out, M, C_in): V_m^T = V[:, m, :]
    y = torch.zeros_like(x)  # (B, N, C)
    for m in range(M):
        W = module.query_key[m].to(x.dtype)  # (C, C)
        q = (x @ W / C)[:, None]  # (B, 1, N, C)
        o, _ = naive_attention(q, x[:, None], x[:, None], scale=1.0)  # (B, 1, N, C)
        y = y + o[:, 0] @ V[:, m, :].T  # (B, N, C)
    return y
