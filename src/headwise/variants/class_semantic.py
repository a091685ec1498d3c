"""Class Semantics-based Attention (registered as ``"class_semantic"``): attention over temporal features driven
by the semantics of action classes (Sridhar et al., "Class Semantics-based Attention for Action Detection", ICCV
2021).

Not dot-product attention: like squeeze-and-excitation, CSA produces importance scores (a channel gate and a
temporal gate) that multiply the features; what is new is that the scores are computed from *class-semantic*
features ``R`` (the action-recognition encoder's output) rather than from the features ``F`` they re-weight.
The reference, the equations with loops over time steps and kernel taps, is :func:`naive_class_semantic`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.checks import check_positive_int, check_tokens
from headwise.variants.base import Capabilities, Variant
from headwise.variants.registry import register

__all__ = ["ClassSemanticAttention", "naive_class_semantic"]


@register("class_semantic")
class ClassSemanticAttention(Variant):
    r"""Class Semantics-based Attention, CSA (Sridhar et al., "Class Semantics-based Attention for Action
    Detection", ICCV 2021), on temporal features.

    An action-detection network encodes class-semantic features ``R`` ``[B, T, S]`` (from an action-recognition
    encoder) into localization features ``F`` ``[B, T, C]``. CSA learns importance scores of ``F`` from ``R``,
    along the channel axis and along the temporal axis, applies both to ``F`` and fuses the two results:

    .. math::

        U = \mathrm{ReLU}(\mathrm{Conv1d}_k(R)) \in \mathbb{R}^{T \times h}  \quad
            \text{(local temporal context of the class semantics, "same" zero padding)}

        a^{ch} = \sigma\big(W_c \tfrac{1}{T}\textstyle\sum_t U_t + b_c\big) \in \mathbb{R}^{C}, \qquad
        a^{t}_t = \sigma(w_t^\top U_t + b_t) \in \mathbb{R}

        \mathrm{out}_{t} = a^{ch} \odot F_t + a^{t}_t\, F_t

    Shapes: ``x`` (``F``) ``[B, T, C]`` with ``C = dim``, ``semantics`` (``R``) ``[B, T, S]`` with
    ``S = semantic_dim`` -> ``[B, T, C]``. Without ``semantics`` the module gates ``x`` by its own features
    (needs ``semantic_dim == dim``).

    Defaults (choices: the paper's exact layer sizes were not available to us): ``hidden = max(1, dim // 4)``,
    ``kernel_size = 3``. Choices made here: one shared local temporal layer feeds both gates; both gates are
    sigmoids (per-channel and per-time-step importance in ``(0, 1)``, as in squeeze-and-excitation, which the
    paper compares against); the two attention-applied features are fused by a sum. With zero gate weights
    and biases both gates are ``1/2`` and the module is the identity (the degenerate case in the tests).
    ``semantics`` is a second input aligned with ``x`` (same ``T``, its own width), not a context to attend to;
    it is optional only when ``semantic_dim == dim`` (otherwise ``capabilities_for`` declares it an input). The
    centred temporal kernel and the mean over time make the gates non-causal; there is no attention matrix for
    ``inspect``.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("class_semantic(semantic_dim=16)", dim=32)
        >>> m(torch.randn(2, 50, 32), torch.randn(2, 50, 16)).shape
        torch.Size([2, 50, 32])
    """

    capabilities = Capabilities(weights="none")
    example_config = {"dim": 16, "hidden": 5}

    @dataclass
    class Config:
        dim: int  # channels C of the encoded features x [B, T, C]
        semantic_dim: int | None = None  # channels S of the class-semantic features [B, T, S]; None: dim
        hidden: int | None = None  # width h of the shared local temporal layer; None: max(1, dim // 4)
        kernel_size: int = 3  # odd temporal kernel of the local layer ("same" padding)

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            if self.semantic_dim is None:
                self.semantic_dim = self.dim
            check_positive_int("semantic_dim", self.semantic_dim)
            if self.hidden is None:
                self.hidden = max(1, self.dim // 4)
            check_positive_int("hidden", self.hidden)
            check_positive_int("kernel_size", self.kernel_size)
            if self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd (a centred temporal window), got kernel_size={self.kernel_size}")

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """``semantics`` is a required input when its width differs from ``dim`` (no self-gating then)."""
        if config.semantic_dim != config.dim:
            return dataclasses.replace(cls.capabilities, inputs=("semantics",))
        return cls.capabilities

    def build(self, cfg) -> None:
        self.local = nn.Conv1d(cfg.semantic_dim, cfg.hidden, cfg.kernel_size, padding=cfg.kernel_size // 2)
        self.channel_gate = nn.Linear(cfg.hidden, cfg.dim)
        self.temporal_gate = nn.Linear(cfg.hidden, 1)

    def scores(self, semantics: Tensor) -> tuple[Tensor, Tensor]:
        """The importance scores from ``semantics`` ``[B, T, S]``: channel ``[B, 1, C]`` and temporal ``[B, T, 1]``."""
        u = torch.relu(self.local(semantics.transpose(1, 2))).transpose(1, 2)  # (B, T, h)
        channel = torch.sigmoid(self.channel_gate(u.mean(1, keepdim=True)))  # (B, 1, C)
        temporal = torch.sigmoid(self.temporal_gate(u))  # (B, T, 1)
        return channel, temporal

    def forward(self, x: Tensor, semantics: Tensor | None = None) -> Tensor:
        """``x`` ``[B, T, C]`` re-weighted by the scores of ``semantics`` ``[B, T, S]`` (``x`` when None)."""
        cfg = self.config
        if isinstance(x, Tensor) and x.dim() == 3 and x.shape[1] < 1:
            raise ValueError(f"x must have T >= 1 time steps, got x.shape={tuple(x.shape)}")
        check_tokens("x", x, cfg.dim)
        if semantics is None:
            if cfg.semantic_dim != cfg.dim:
                raise ValueError(f"semantics is required when semantic_dim={cfg.semantic_dim} != dim={cfg.dim}")
            semantics = x
        check_tokens("semantics", semantics, cfg.semantic_dim)
        if semantics.shape[:2] != x.shape[:2]:
            raise ValueError(f"semantics must share x's batch and time axes (T >= 1), got x.shape={tuple(x.shape)} "
                             f"semantics.shape={tuple(semantics.shape)}")
        channel, temporal = self.scores(semantics)  # (B, 1, C), (B, T, 1)
        return channel * x + temporal * x  # (B, T, C)


def naive_class_semantic(m: ClassSemanticAttention, x: Tensor, semantics: Tensor) -> Tensor:
    """Reference of :class:`ClassSemanticAttention` with its own weights: the CSA equations with explicit loops
    over time steps and kernel taps (zero padding outside ``[0, T)``). ``x`` ``[B, T, C]``, ``semantics``
    ``[B, T, S]`` -> ``[B, T, C]``."""
    B, T, _ = x.shape
    w, b = m.local.weight, m.local.bias  # (h, S, k), (h,)
    k = w.shape[-1]
    u = []
    for t in range(T):
        acc = b.expand(B, -1).clone()  # (B, h)
        for j in range(k):
            s = t + j - k // 2
            if 0 <= s < T:
                acc = acc + semantics[:, s] @ w[:, :, j].T
        u.append(torch.relu(acc))
    u = torch.stack(u, 1)  # (B, T, h)
    a_ch = torch.sigmoid(u.mean(1) @ m.channel_gate.weight.T + m.channel_gate.bias)  # (B, C)
    out = []
    for t in range(T):
        a_t = torch.sigmoid(u[:, t] @ m.temporal_gate.weight.T + m.temporal_gate.bias)  # (B, 1)
        out.append(a_ch * x[:, t] + a_t * x[:, t])
    return torch.stack(out, 1)  # (B, T, C)
