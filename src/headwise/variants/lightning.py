"""TransNormerLLM's token mixer computed by Lightning Attention-2 (registered as ``"lightning"``).

Qin et al., 2024, "TransNormerLLM" / "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
Attention" and "Lightning Attention-2": gated causal linear attention with per-head decay and an SRMS norm. The
functional core is :mod:`headwise.ops.linear` (the tiled fast path ``chunk.py``, the decoding recurrence
``recurrent.py``, the reference ``naive.py``); forward / prefill / step come from
:class:`~headwise.variants.linear.RecurrentMixer`. The module's reference is :func:`naive_lightning`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_bool, check_positive_int, check_tokens, resolve_head_dim
from headwise.ops.linear import decay_rates, naive_linear_attention
from headwise.variants.base import Capabilities
from headwise.variants.linear import RecurrentMixer
from headwise.variants.registry import register

__all__ = ["LightningAttention", "naive_lightning"]


@register("lightning")
class LightningAttention(RecurrentMixer):
    r"""The TransNormerLLM token mixer: gated linear attention with decay, computed by Lightning Attention-2.

    From "TransNormerLLM" / "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning
    Attention" (Qin et al., 2024) and "Lightning Attention-2" (Qin et al., 2024). Per layer:

    .. math::

        Q = \phi(X W_Q),\ K = \phi(X W_K),\ V = X W_V,\ U = X W_U \qquad (\phi = \mathrm{SiLU})

        O_h = \big((Q_h K_h^\top) \odot M_h\big) V_h, \qquad M_{h,ij} = \lambda_h^{\,i-j}\ (i \ge j),\ 0\ (i < j)

        Y = \big(\mathrm{SRMSNorm}([O_1, \dots, O_H]) \odot U\big) W_O, \qquad
        \mathrm{SRMSNorm}(x) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}

    with ``lambda_h`` from :func:`headwise.ops.linear.decay_rates` (ALiBi slopes scaled by depth
    ``1 - layer / (num_layers - 1)``), no ``1/sqrt(d)`` scale and no denominator (the norm replaces it).

    Shapes: ``x`` ``[B, N, C]`` -> ``[B, N, C]``; inside, ``[B, H, N, D]``. Causal. Decoding: :meth:`prefill` over
    a prompt, then :meth:`step` per token; the state is ``[B, H, D, D]``.

    Fields (:class:`LightningAttention.Config`):
        dim: model width ``C``. heads: ``H``. head_dim: ``D``, default ``dim // heads``.
        layer, num_layers: position of this layer in the stack (sets the decay; default a single layer).
        decay: use the per-head decay (default True); False is plain causal linear attention (lambda = 1).
        chunk: Lightning Attention-2 tile in tokens (default 64; speed only, same result; formerly ``block_size``).
        qkv_bias, out_bias: biases in the fused input projection and the output projection (default False, as in
            TransNormerLLM; the former ``bias=`` sets both).

    Choices made here (following the official TransNormerLLM code where the paper is silent): ``W_Q, W_K, W_V,
    W_U`` are one fused projection ``qkvu_proj`` (its checkpoint key); the gate ``U`` has no activation; SRMSNorm
    runs over all ``H D`` channels with ``eps = 1e-6`` and no weight. The optional LRPE positional encoding of the
    paper is not included. :meth:`attention_weights` is the mixing matrix ``(Q K^T) * M``: signed (SiLU features
    go below zero) and unnormalised, not probabilities.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("lightning(layer=3, num_layers=12)", dim=64, heads=4)
        >>> x = torch.randn(2, 100, 64)
        >>> y = m(x)                                             # [2, 100, 64]
        >>> y_prompt, state = m.prefill(x[:, :90])
        >>> y_next, state = m.step(x[:, 90], state)              # == y[:, 90]
        >>> torch.allclose(y_next, y[:, 90], atol=1e-5)
        True
    """

    capabilities = Capabilities(causal="always", decode=True, weights="scores")
    example_config = {"dim": 16, "heads": 2, "chunk": 3, "layer": 1, "num_layers": 3}
    aliases = {"block_size": "chunk", "bias": ("qkv_bias", "out_bias")}
    norm_eps = 1e-6  # SRMSNorm epsilon

    @dataclass
    class Config:
        dim: int  # model width C of the input x [B, N, C] and of the output
        heads: int  # number of heads H
        head_dim: int | None = None  # per-head width D; None: dim // heads
        layer: int = 0  # index of this layer in the stack, 0 <= layer < num_layers (sets the decay)
        num_layers: int = 1  # layers in the stack; the decay weakens with depth
        decay: bool = True  # per-head decay lambda_h (False: lambda = 1, no decay)
        chunk: int = 64  # tokens per Lightning Attention-2 tile (speed only, same result)
        qkv_bias: bool = False  # bias in the fused q, k, v, u input projection
        out_bias: bool = False  # bias in the output projection

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("heads", self.heads)
            self.head_dim = resolve_head_dim(self.dim, self.heads, self.head_dim)
            check_positive_int("num_layers", self.num_layers)
            if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 0 <= self.layer < self.num_layers:
                raise ValueError(f"layer must be an int with 0 <= layer < num_layers, got layer={self.layer!r} "
                                 f"num_layers={self.num_layers}")
            check_positive_int("chunk", self.chunk)
            check_bool("decay", self.decay)
            check_bool("qkv_bias", self.qkv_bias)
            check_bool("out_bias", self.out_bias)

    def build(self, cfg) -> None:
        inner = cfg.heads * cfg.head_dim
        self.qkvu_proj = nn.Linear(cfg.dim, 4 * inner, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(inner, cfg.dim, bias=cfg.out_bias)
        # a constant (float64, not a parameter or buffer: .half() must not round it)
        self.decay = decay_rates(cfg.heads, layer=cfg.layer, num_layers=cfg.num_layers) if cfg.decay else None

    def features(self, x: Tensor):
        """``x`` ``[B, N, C]`` -> ``SiLU(q)``, ``SiLU(k)``, ``v`` ``[B, H, N, D]`` and the gate ``u`` ``[B, N, H D]``."""
        B, N, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)  # 4 x (B, N, H*D)
        heads = lambda t: t.view(B, N, self.config.heads, -1).transpose(1, 2)  # (B, H, N, D)
        return heads(F.silu(q)), heads(F.silu(k)), heads(v), u

    def readout(self, o: Tensor, u: Tensor) -> Tensor:
        """``SRMSNorm`` of the merged heads ``o`` ``[B, H, N, D]``, gated by ``u``, output projection."""
        B, H, N, D = o.shape
        o = o.transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)  # SRMSNorm
        return self.out_proj(o * u)  # (B, N, C)

    def attention_weights(self, x: Tensor) -> Tensor:
        """The mixing matrix ``[B, H, N, N]`` over ``x`` ``[B, N, C]``: ``(Q K^T) * M`` (``M`` the causal decay
        mask), the op applied to the values ``V = I`` (the reference :func:`headwise.ops.linear.naive_linear_attention`),
        so ``weights @ V`` is the head output before the norm. Signed and unnormalised (see the class docstring);
        ``O(N^2)`` memory, for inspection sizes."""
        check_tokens("x", x, self.config.dim)
        q, k, _, _ = self.features(x)  # (B, H, N, D)
        B, H, N, _ = q.shape
        eye = torch.eye(N, dtype=q.dtype, device=q.device).expand(B, H, N, N)  # (B, H, N, N)
        return naive_linear_attention(q, k, eye, self.decay, scale=self.scale, normalize=self.normalize)[0]


def naive_lightning(m: LightningAttention, x: Tensor) -> Tensor:
    """The reference of :class:`LightningAttention`, its equations written out with the module's own weights:
    ``F.linear`` of the fused projection cut into ``W_Q, W_K, W_V, W_U``, SiLU features, the materialized
    ``((Q K^T) * M) V`` of :func:`~headwise.ops.linear.naive_linear_attention` with the decay recomputed from the
    config, SRMSNorm, the gate ``U``, the output projection. ``x`` ``[B, N, C]`` -> ``[B, N, C]``."""
    cfg = m.config
    B, N, _ = x.shape
    H, D = cfg.heads, cfg.head_dim
    q, k, v, u = F.linear(x, m.qkvu_proj.weight, m.qkvu_proj.bias).chunk(4, dim=-1)  # 4 x (B, N, H*D)
    heads = lambda t: t.reshape(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    decay = decay_rates(H, layer=cfg.layer, num_layers=cfg.num_layers) if cfg.decay else None
    o, _ = naive_linear_attention(heads(F.silu(q)), heads(F.silu(k)), heads(v), decay)  # no scale, no normalizer
    o = o.transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)  # SRMSNorm
    return F.linear(o * u, m.out_proj.weight, m.out_proj.bias)  # (B, N, C)
