"""ACMIL's multiple-branch attention pooling with stochastic top-k instance masking (registered as
``"mil_attention"``).

Zhang et al., ECCV 2024, "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
on the gated attention pooling of Ilse, Tomczak and Welling (ICML 2018). Additive attention with learned branch
queries pools a bag of instances; the scores stay explicit because the top-k instance masking and the outputs need
them. The reference is :func:`naive_gated_pooling` (one branch, written out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from headwise.checks import check_number, check_positive_int
from headwise.variants.base import Capabilities, Variant
from headwise.variants.registry import register

__all__ = ["MILAttention", "MILOutput", "naive_gated_pooling"]


class MILOutput(NamedTuple):
    """What :class:`MILAttention` returns."""

    bag: Tensor  # [B, C] bag embedding, pooled with the branch-averaged (unmasked) attention
    branches: Tensor  # [B, M, C] per-branch bag embeddings, pooled with the (masked) branch attention
    attention: Tensor  # [B, M, N] per-branch attention over instances (after masking), rows sum to 1
    logits: Tensor | None  # [B, classes] bag classifier on ``bag`` (None when classes is None)
    branch_logits: Tensor | None  # [B, M, classes] one classifier per branch (None when classes is None)


@register("mil_attention")
class MILAttention(Variant):
    r"""Multiple-branch attention pooling with stochastic top-k instance masking, from "Attention-Challenging
    Multiple Instance Learning for Whole Slide Image Classification" (ACMIL; Zhang et al., ECCV 2024), built on
    gated attention pooling (Ilse, Tomczak and Welling, ICML 2018).

    For a bag of ``N`` instances ``h_k`` (``[B, N, C]``) and ``M`` branches:

    .. math::

        s_{m,k} = w_m^\top\big(\tanh(V h_k) \odot \sigma(U h_k)\big),\qquad
        a_{m,k} = \mathrm{softmax}_k(s_{m,k} + \mathrm{mask}_{m,k}),\qquad
        z_m = \sum_k a_{m,k} h_k

    (Multiple Branch Attention). STKIM: in training, among each branch's top-``k`` instances (by ``s``),
    ``floor(k p)`` chosen uniformly at random get ``mask = -inf``, so a branch cannot rely on a few instances
    (``k = mask_topk``, ``p = mask_ratio``). The bag embedding pools with the branch-averaged *unmasked*
    attention, ``\bar a_k = \frac{1}{M}\sum_m \mathrm{softmax}_k(s_{m,k})``, ``z = \sum_k \bar a_k h_k``; with
    ``classes`` set, a linear classifier per branch gives ``branch_logits`` (trained with the bag label and the
    paper's diversity loss) and one on ``z`` gives ``logits``.

    Shapes: bag ``x`` ``[B, N, C]`` -> :class:`MILOutput` (``bag`` ``[B, C]``, ``branches`` ``[B, M, C]``,
    ``attention`` ``[B, M, N]``, ``logits`` ``[B, classes]``, ``branch_logits`` ``[B, M, classes]``).

    Args:
        dim: instance feature width ``C``.
        branches: number of attention branches ``M`` (default 5, ACMIL's).
        hidden: width ``L`` of ``V`` and ``U`` (default 128).
        mask_topk: ``k``, the number of top instances eligible for masking (default 10); 0 disables STKIM.
        mask_ratio: ``p``, the fraction of them masked, in ``[0, 1]`` (default 0.6, ACMIL's).
        classes: number of classes for the classifiers; None (default) returns no logits.

    Choices made here: masking uses ``floor(k p)`` instances as the authors' code does (not a Bernoulli draw
    per instance), with ``k = min(mask_topk, N)``, and never masks all ``N`` instances of a branch (at most
    ``N - 1``). The top-k selection uses the scores without gradient. ACMIL's feature-reduction layer before
    pooling is left to the caller. Masking is active only in ``train()`` mode. The module pools a bag (order-free)
    into one embedding: it is not a token mixer (its first output is ``[B, C]``).

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("mil_attention(classes=2)", dim=64).eval()
        >>> out = m(torch.randn(1, 500, 64))        # one bag of 500 instances
        >>> out.bag.shape, out.logits.shape, out.attention.shape
        (torch.Size([1, 64]), torch.Size([1, 2]), torch.Size([1, 5, 500]))
    """

    # yet; its [B, M, N] branch attention has no per-token queries, so no [B, H, N, M] weights either
    capabilities = Capabilities(layout="set", output="tuple", weights="none", mixer=False)  # first output: [B, C]
    example_config = {"dim": 16, "branches": 3, "hidden": 8, "mask_topk": 4, "classes": 3}
    aliases = {"mask_top_k": "mask_topk"}

    @dataclass
    class Config:
        dim: int  # instance feature width C of the bag [B, N, C]
        branches: int = 5  # number of attention branches M
        hidden: int = 128  # width L of the gated attention's V and U projections
        mask_topk: int = 10  # top instances per branch eligible for stochastic masking; 0: no masking
        mask_ratio: float = 0.6  # fraction of the top-k instances masked in training, in [0, 1]
        classes: int | None = None  # classes of the bag and branch classifiers; None: no classifiers

        def __post_init__(self):
            check_positive_int("dim", self.dim)
            check_positive_int("branches", self.branches)
            check_positive_int("hidden", self.hidden)
            if isinstance(self.mask_topk, bool) or not isinstance(self.mask_topk, int) or self.mask_topk < 0:
                raise ValueError(f"mask_topk must be a non-negative int, got mask_topk={self.mask_topk!r}")
            self.mask_ratio = check_number("mask_ratio", self.mask_ratio, 0, 1)
            if self.classes is not None:
                check_positive_int("classes", self.classes)

    def build(self, cfg) -> None:
        self.V = nn.Linear(cfg.dim, cfg.hidden)
        self.U = nn.Linear(cfg.dim, cfg.hidden)
        self.w = nn.Linear(cfg.hidden, cfg.branches)  # rows: the branch vectors w_m
        if cfg.classes is not None:
            self.branch_classifiers = nn.ModuleList(nn.Linear(cfg.dim, cfg.classes) for _ in range(cfg.branches))
            self.classifier = nn.Linear(cfg.dim, cfg.classes)

    def scores(self, x: Tensor) -> Tensor:
        """Gated attention scores ``s`` ``[B, M, N]`` of the instances ``x`` ``[B, N, C]``."""
        g = torch.tanh(self.V(x)) * torch.sigmoid(self.U(x))  # (B, N, L)
        return self.w(g).transpose(1, 2)  # (B, M, N)

    def instance_mask(self, s: Tensor) -> Tensor:
        """STKIM's mask ``[B, M, N]`` (True = masked): ``floor(k p)`` random instances among each branch's top k."""
        B, M, N = s.shape
        k = min(self.config.mask_topk, N)
        drop = min(int(k * self.config.mask_ratio), N - 1)
        mask = torch.zeros_like(s, dtype=torch.bool)
        if drop == 0:
            return mask
        top = s.detach().topk(k, dim=-1).indices  # (B, M, k)
        pick = torch.rand(B, M, k, device=s.device).argsort(dim=-1)[..., :drop]  # (B, M, drop)
        return mask.scatter(-1, torch.gather(top, -1, pick), True)  # (B, M, N)

    def forward(self, x: Tensor) -> MILOutput:
        """Pool the bag ``x`` ``[B, N, C]``; returns :class:`MILOutput`."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.config.dim or x.shape[1] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a bag [B, N, C] with N >= 1 and C = dim = {self.config.dim}, got {got}")
        s = self.scores(x)  # (B, M, N)
        a = torch.softmax(s, dim=-1)  # (B, M, N) unmasked
        bag = a.mean(1, keepdim=True) @ x  # (B, 1, C)
        if self.training and self.config.mask_topk > 0:
            a = torch.softmax(s.masked_fill(self.instance_mask(s), -math.inf), dim=-1)  # (B, M, N)
        branches = a @ x  # (B, M, C)
        bag = bag[:, 0]  # (B, C)
        logits = branch_logits = None
        if self.config.classes is not None:
            logits = self.classifier(bag)  # (B, classes)
            branch_logits = torch.stack([f(branches[:, m]) for m, f in enumerate(self.branch_classifiers)], 1)
        return MILOutput(bag, branches, a, logits, branch_logits)


def naive_gated_pooling(m: MILAttention, x: Tensor, branch: int = 0) -> tuple[Tensor, Tensor]:
    """Reference for one branch of :class:`MILAttention` without masking: Ilse et al.'s gated attention pooling
    ``a = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, ``z = sum_k a_k h_k``. ``x`` ``[B, N, C]`` ->
    ``(z [B, C], a [B, N])``."""
    g = torch.tanh(x @ m.V.weight.T + m.V.bias) * torch.sigmoid(x @ m.U.weight.T + m.U.bias)  # (B, N, L)
    a = torch.softmax(g @ m.w.weight[branch] + m.w.bias[branch], dim=-1)  # (B, N)
    return (a[..., None] * x).sum(1), a  # (B, C), (B, N)
