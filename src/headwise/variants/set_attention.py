"""The Distribution Transformer layer with OAT's object-level positions (registered as ``"set_attention"``).

Whittle et al., 2025, "Distribution Transformers: Fast Approximate Bayesian Inference With On-The-Fly Prior
Adaptation": the components of a Gaussian mixture (a *set*) attend to each other and then to the data points;
Fang et al., ECCV 2024, "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction": set members with
real coordinates get a sinusoidal encoding of them (:func:`object_positional_encoding`). Both attentions are
:class:`~headwise.variants.base.SoftmaxAttention` (projections around :func:`headwise.attention`); the data
points are the ``context`` of the cross-attention. The reference is :func:`naive_set_attention`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.variants.base import Capabilities, SoftmaxAttention, Variant
from headwise.variants.mha import naive_mha
from headwise.variants.registry import register

__all__ = ["object_positional_encoding", "SetAttention", "naive_set_attention"]


def object_positional_encoding(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    r"""Sinusoidal encoding of continuous object coordinates ``positions`` ``[..., P]`` -> ``[..., dim]``.

    Each of the ``P`` coordinates gets ``dim / P`` channels: ``sin(p w_i), cos(p w_i)`` with
    ``w_i = base^{-2i / (dim/P)}`` (the Transformer's encoding, per axis, on real-valued positions), so two
    objects' encodings have a dot product that depends only on their coordinate differences.

    Example:
        >>> import torch
        >>> object_positional_encoding(torch.tensor([[0.0, 0.0]]), 8)     # 2 coordinates x (2 sin + 2 cos)
        tensor([[0., 0., 1., 1., 0., 0., 1., 1.]])
    """
    if not isinstance(positions, Tensor) or positions.dim() < 1:
        raise TypeError(f"positions must be a tensor [..., P], got {type(positions).__name__}")
    P = positions.shape[-1]
    if dim % (2 * P):
        raise ValueError(f"dim must be divisible by 2 * P = {2 * P} for P={P} coordinates, got dim={dim}")
    half = dim // (2 * P)
    freqs = base ** (-torch.arange(half, dtype=positions.dtype, device=positions.device) / half)  # (half,)
    angles = positions[..., None] * freqs  # (..., P, half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., P * 2 * half) = (..., dim)


@register("set_attention")
class SetAttention(Variant):
    r"""The Distribution Transformer layer, from "Distribution Transformers: Fast Approximate Bayesian Inference
    With On-The-Fly Prior Adaptation" (Whittle et al., 2025), with the object-level positional encoding of
    "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction" (Fang et al., ECCV 2024).

    The tokens are a *set*: the components of a Gaussian mixture (prior -> posterior) or the objects of a scene.
    The components attend to each other and then to the data points (pre-norm residual blocks):

    .. math::

        z \leftarrow z + \mathrm{MHA}_{self}(\mathrm{LN}_1(z)),\qquad
        z \leftarrow z + \mathrm{MHA}_{cross}(\mathrm{LN}_2(z), \mathrm{LN}_d(d)),\qquad
        z \leftarrow z + \mathrm{MLP}(\mathrm{LN}_3(z))

    with ``z`` ``[B, K, C]`` the component (or object) tokens and ``d`` ``[B, M, C]`` the embedded data points
    (the ``context``). Without a context the cross-attention block is skipped. There is no sequence position:
    the layer is equivariant to permuting the components and invariant to permuting the data points. Where the
    set members have locations (OAT's objects), ``positions`` ``[B, K, P]`` (and ``context_positions``
    ``[B, M, P]``) are encoded by :func:`object_positional_encoding` and added to the tokens before the layer --
    one encoding per object at its real coordinates, not per patch of a grid.

    Shapes: ``z`` ``[B, K, C]``, ``context`` ``[B, M, C]`` -> ``[B, K, C]``.

    Args:
        dim, heads, kv_heads, head_dim, backend: as :class:`~headwise.variants.mha.MultiHeadAttention` (both
            attentions: ``self_attn`` and ``cross_attn``, each with ``q_proj``, ``k_proj``, ``v_proj``,
            ``out_proj``).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim`` (default 4).

    Choices made here: the Distribution Transformer embeds each GMM component's parameters (weight, mean,
    covariance factor) into a token and decodes the output tokens back into GMM parameters; those task-specific
    embedding and read-out maps are left to the caller, and this module is the attention layer between them.
    The data tokens get their own LayerNorm. OAT's encoding is sinusoidal over object centres; its paper also
    reshapes the similarity fall-off of the encodings (a fitted power of the cosine similarity), which is not
    reproduced here. Every component sees every other: no causal mode.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("set_attention", dim=64, heads=4)
        >>> prior = torch.randn(2, 8, 64)                     # 8 mixture components
        >>> m(prior, torch.randn(2, 100, 64)).shape           # attend to 100 data points
        torch.Size([2, 8, 64])
    """

    capabilities = Capabilities(layout="set", context=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "mlp_ratio": 2.0}

    @dataclass
    class Config:
        dim: int  # token width C of the components/objects and of the data points
        heads: int  # attention heads H of both attentions
        kv_heads: int | None = None  # key/value heads of both attentions; None: heads
        head_dim: int | None = None  # per-head width; None: dim // heads
        mlp_ratio: float = 4.0  # MLP hidden width as a multiple of dim
        backend: str = "auto"  # headwise.attention backend of both attentions

        def __post_init__(self):
            attn = SoftmaxAttention.Config(**self.attention_fields())  # validates the attention fields
            self.kv_heads, self.head_dim = attn.kv_heads, attn.head_dim
            r = self.mlp_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 or int(r * self.dim) < 1:
                raise ValueError(f"mlp_ratio must be a positive number with mlp_ratio * dim >= 1, got mlp_ratio={r!r}")

        def attention_fields(self) -> dict:
            """The config of each of the two attentions."""
            return dict(dim=self.dim, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                        backend=self.backend)

    def build(self, cfg) -> None:
        C = cfg.dim
        self.norm_self, self.norm_cross, self.norm_data, self.norm_mlp = (nn.LayerNorm(C) for _ in range(4))
        self.self_attn = SoftmaxAttention(**cfg.attention_fields())
        self.cross_attn = SoftmaxAttention(**cfg.attention_fields())
        hidden = int(cfg.mlp_ratio * C)
        self.mlp = nn.Sequential(nn.Linear(C, hidden), nn.GELU(), nn.Linear(hidden, C))

    def forward(self, z: Tensor, context: Tensor | None = None, *, positions: Tensor | None = None,
                context_positions: Tensor | None = None, data: Tensor | None = None,
                data_positions: Tensor | None = None) -> Tensor:
        """Components ``z`` ``[B, K, C]`` attend to each other, then to the data points ``context`` ``[B, M, C]``
        (skipped when None); returns ``[B, K, C]``. ``positions`` ``[B, K, P]`` and ``context_positions``
        ``[B, M, P]``: object coordinates, encoded and added first. ``data`` and ``data_positions`` are the old
        names of ``context`` and ``context_positions`` (accepted with a ``FutureWarning``)."""
        context = _renamed("data", data, "context", context)
        context_positions = _renamed("data_positions", data_positions, "context_positions", context_positions)
        dim = self.config.dim
        if positions is not None:
            self._check_positions("positions", positions, z)
            z = z + object_positional_encoding(positions.to(z.dtype), dim)  # (B, K, C)
        z = z + self.self_attn(self.norm_self(z))  # (B, K, C)
        if context is not None:
            if context_positions is not None:
                self._check_positions("context_positions", context_positions, context)
                context = context + object_positional_encoding(context_positions.to(context.dtype), dim)  # (B, M, C)
            a = self.cross_attn
            z = z + a.finish(a.attend(*a.project(self.norm_cross(z), self.norm_data(context))))  # (B, K, C)
        elif context_positions is not None:
            raise ValueError("context_positions given without context")
        return z + self.mlp(self.norm_mlp(z))  # (B, K, C)

    def example(self, batch: int = 2, *, generator: torch.Generator | None = None) -> tuple:
        """Components ``[batch, 7, C]`` and a context of 5 data points ``[batch, 5, C]`` (both blocks run)."""
        (z,) = super().example(batch, generator=generator)
        return z, self.example_randn(batch, 5, self.config.dim, generator=generator)

    @staticmethod
    def _check_positions(name: str, pos, tokens: Tensor) -> None:
        if not isinstance(pos, Tensor) or pos.dim() != 3 or pos.shape[:2] != tokens.shape[:2]:
            got = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
            raise ValueError(f"{name} must be [B, K, P] matching the tokens' [B, K] = {list(tokens.shape[:2])}, "
                             f"got {name}.shape={got}")


def _renamed(old: str, old_value, new: str, new_value):
    """The value of a renamed forward keyword: the new one, or the old one with a ``FutureWarning``."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(f"set_attention: {old}= is the old name of {new}=; give only the new, got {old}= and {new}=")
    warnings.warn(f"set_attention: {old}= is renamed {new}=; the old name will be removed", FutureWarning,
                  stacklevel=3)
    return old_value


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias)


def naive_set_attention(m: SetAttention, z: Tensor, context: Tensor | None = None) -> Tensor:
    """Reference of :class:`SetAttention` (without positions) with its own weights: LayerNorms written out, both
    attentions by :func:`~headwise.variants.mha.naive_mha` (materialized softmax), the MLP by ``F.linear``."""
    zn = _layer_norm(m.norm_self, z)
    z = z + naive_mha(m.self_attn, zn, zn)  # (B, K, C)
    if context is not None:
        z = z + naive_mha(m.cross_attn, _layer_norm(m.norm_cross, z), _layer_norm(m.norm_data, context))
    h = F.gelu(F.linear(_layer_norm(m.norm_mlp, z), m.mlp[0].weight, m.mlp[0].bias))  # (B, K, hidden)
    return z + F.linear(h, m.mlp[2].weight, m.mlp[2].bias)  # (B, K, C)
