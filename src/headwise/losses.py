"""Training losses that attention papers add beside their modules (not attention modules, not registered).

* :class:`AMCLLoss`: the multi-head contrastive loss with adaptive temperatures of AMCL (Wang et al.,
  "Adaptive Multi-head Contrastive Learning", ECCV 2024), SimCLR form; :func:`amcl_terms` is its functional core.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwise.checks import check_positive_int

__all__ = ["AMCLLoss", "amcl_terms", "temperature_regularizer", "naive_amcl_loss"]


def temperature_regularizer(tau: Tensor, dim: int) -> Tensor:
    """``Omega(tau) = dim / 2 * log(tau) + 1 / tau``: the log-normalizer of the head-wise posterior of a positive
    pair (AMCL), which keeps a positive pair's temperature from collapsing to 0 unless its similarity is 1."""
    return 0.5 * dim * torch.log(tau) + 1.0 / tau


def amcl_terms(s_pos: Tensor, tau_pos: Tensor, s_neg: Tensor, tau_neg: Tensor, *, dim: int, beta: float) -> Tensor:
    r"""Per-anchor AMCL loss from similarities and their temperatures (the functional core of :class:`AMCLLoss`).

    .. math::

        \ell = -\frac{s^+}{\tau^+} + \beta\,\Omega(\tau^+)
               + \frac{1}{K}\sum_{k=1}^{K} \frac{s^-_k}{\tau^-_k}
               - \beta \sum_{k=1}^{K} \big(\log \tau^-_k + 1/\tau^-_k\big),
        \qquad \Omega(\tau) = \tfrac{d}{2}\log\tau + \tfrac{1}{\tau}

    ``s_pos``, ``tau_pos``: ``[...]``; ``s_neg``, ``tau_neg``: ``[..., K]`` (the kept negatives). Returns ``[...]``.
    """
    pos = -s_pos / tau_pos + beta * temperature_regularizer(tau_pos, dim)  # (...)
    neg = (s_neg / tau_neg).mean(-1) - beta * (torch.log(tau_neg) + 1.0 / tau_neg).sum(-1)  # (...)
    return pos + neg


class AMCLLoss(nn.Module):
    r"""Adaptive multi-head contrastive loss, AMCL (Wang, Koniusz, Gedeon, Zheng, "Adaptive Multi-head Contrastive
    Learning", ECCV 2024), SimCLR form: ``H`` projection heads, every (anchor, other view) pair re-weighted by its
    own adaptive temperature. A plain :class:`torch.nn.Module` (it owns the temperature network), not an
    attention module.

    Inputs ``z1``, ``z2`` ``[B, H, d]``: the ``H`` heads' projections of two views of ``B`` images. Per head ``h``
    and anchor ``a = z1[i, h]`` (then symmetrically ``a = z2[i, h]``), with cosine similarities ``s``:

    * positive ``p = z2[i, h]``; negatives the ``2B - 2`` other views ``z1[j, h], z2[j, h]`` (``j != i``), of
      which the ``topk`` most similar are kept (the paper's top-k approximation; ``topk=None`` keeps all);
    * pair temperature ``tau(a, b) = tau_min + (tau_max - tau_min) * sigmoid(-phi(a) . phi(b))`` with ``phi`` a
      two-layer MLP ``d -> hidden -> d`` shared by all heads (similar pairs get low temperatures);
    * the per-anchor loss of :func:`amcl_terms` (the maximum-likelihood objective over the head-wise posteriors
      of positives, with the temperature regularizer ``Omega``).

    ``loss = sum_h mean_{anchors, both directions} l``. Defaults follow the authors' reference code
    (``LeiWangR/cl``): ``beta = 0.01``, ``tau_min = 1e-5``, ``tau_max = 2``, ``topk = 100``, ``hidden = d``.

    Choices: embeddings are L2-normalized before the similarities and ``phi``; the two directions are averaged
    and the heads summed, as in that code.

    Example::

        >>> loss_fn = AMCLLoss(dim=32, heads=3)
        >>> z1, z2 = torch.randn(8, 3, 32), torch.randn(8, 3, 32)
        >>> loss_fn(z1, z2).shape
        torch.Size([])
    """

    def __init__(self, dim: int, heads: int, *, beta: float = 0.01, tau_min: float = 1e-5, tau_max: float = 2.0,
                 topk: int | None = 100, hidden: int | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        for name, value in (("beta", beta), ("tau_min", tau_min), ("tau_max", tau_max)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got beta={beta!r}")
        if not 0 < tau_min < tau_max:
            raise ValueError(f"need 0 < tau_min < tau_max, got tau_min={tau_min!r} tau_max={tau_max!r}")
        if topk is not None:
            check_positive_int("topk", topk)
        hidden = dim if hidden is None else hidden
        check_positive_int("hidden", hidden)
        self.dim, self.heads, self.beta, self.topk = dim, heads, float(beta), topk
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def temperature(self, a: Tensor, b: Tensor) -> Tensor:
        """Pair temperatures in ``(tau_min, tau_max)`` of normalized embeddings ``a`` ``[..., d]``, ``b`` ``[..., d]``."""
        score = (self.phi(a) * self.phi(b)).sum(-1)  # (...)
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(-score)

    def direction(self, anchor: Tensor, positive: Tensor, others: Tensor) -> Tensor:
        """Mean loss of anchors ``[B, d]`` with positives ``[B, d]`` and negatives ``others`` ``[B, K, d]``."""
        s_pos = (anchor * positive).sum(-1)  # (B,)
        s_neg = (anchor[:, None] * others).sum(-1)  # (B, K)
        tau_pos = self.temperature(anchor, positive)  # (B,)
        tau_neg = self.temperature(anchor[:, None].expand_as(others), others)  # (B, K)
        if self.topk is not None and self.topk < others.shape[1]:
            s_neg, idx = s_neg.topk(self.topk, dim=1)  # (B, k) the hardest negatives
            tau_neg = tau_neg.gather(1, idx)
        return amcl_terms(s_pos, tau_pos, s_neg, tau_neg, dim=self.dim, beta=self.beta).mean()

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """``z1``, ``z2`` ``[B, H, d]`` (``B >= 2``) -> the scalar loss."""
        for name, z in (("z1", z1), ("z2", z2)):
            if not isinstance(z, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [B, H, d], got {type(z).__name__}")
            if z.dim() != 3 or z.shape[0] < 2 or z.shape[1:] != (self.heads, self.dim):
                raise ValueError(f"{name} must be [B, {self.heads}, {self.dim}] with B >= 2, "
                                 f"got {name}.shape={tuple(z.shape)}")
        if z1.shape != z2.shape:
            raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        B = z1.shape[0]
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)  # (B, H, d)
        others = ~torch.eye(B, dtype=torch.bool, device=z1.device)  # (B, B): j != i
        total = z1.new_zeros(())
        for h in range(self.heads):
            a, p = z1[:, h], z2[:, h]  # (B, d)
            same = a[None].expand(B, B, -1)[others].view(B, B - 1, -1)  # (B, B-1, d) other images, view 1
            other = p[None].expand(B, B, -1)[others].view(B, B - 1, -1)  # (B, B-1, d) other images, view 2
            forward = self.direction(a, p, torch.cat([same, other], 1))  # anchors in view 1
            backward = self.direction(p, a, torch.cat([other, same], 1))  # anchors in view 2
            total = total + 0.5 * (forward + backward)
        return total

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, beta={self.beta}, tau_min={self.tau_min}, "
                f"tau_max={self.tau_max}, topk={self.topk}")


def naive_amcl_loss(z1: Tensor, z2: Tensor, tau: float, dim: int, beta: float, topk: int | None = None) -> float:
    """The reference of :class:`AMCLLoss` at a constant temperature ``tau``: the paper's loss written with explicit
    loops over heads, the two directions and the anchors (``z1``, ``z2`` ``[B, H, dim]``, ``topk`` hardest negatives
    or all when None); a float."""
    B, H, _ = z1.shape
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    total = 0.0
    for h in range(H):
        for a_view, p_view in ((z1, z2), (z2, z1)):
            per_anchor = []
            for i in range(B):
                a = a_view[i, h]
                s_pos = float(a @ p_view[i, h])
                negs = sorted((float(a @ v[j, h]) for v in (a_view, p_view) for j in range(B) if j != i), reverse=True)
                negs = negs[:topk] if topk else negs
                term = -s_pos / tau + beta * (dim / 2 * math.log(tau) + 1 / tau)
                term += sum(s / tau for s in negs) / len(negs) - beta * len(negs) * (math.log(tau) + 1 / tau)
                per_anchor.append(term)
            total += 0.5 * sum(per_anchor) / B
    return total
