"""Sparsifiner, learned instance-dependent sparse attention (registered as ``"sparsifiner"``).

Wei et al., CVPR 2023, "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers": a low-rank connectivity predictor chooses the keys each query keeps, and exact attention runs on
that mask. The attention over the kept keys is :func:`headwise.ops.topk.keep_attention` (chunked, recomputed in
the backward; its reference :func:`headwise.core.reference.masked_attention`); this module owns the projections,
the predictor and its distillation loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwise.checks import check_bool, check_number, check_positive_int
from headwise.ops.selection.tokens import topk_mask
from headwise.ops.topk import keep_attention
from headwise.ops.topk.topk import expand_heads, gqa_scores
from headwise.variants.base import Capabilities, ProjectedAttention
from headwise.variants.registry import register

__all__ = ["Sparsifiner"]


@register("sparsifiner")
class Sparsifiner(ProjectedAttention):
    r"""Sparsifiner's learned, instance-dependent sparse attention ("Sparsifiner: Learning Sparse
    Instance-Dependent Attention for Efficient Vision Transformers", Wei et al., CVPR 2023).

    A low-rank connectivity predictor estimates the attention map; each query keeps its ``budget`` best-connected
    keys and exact attention runs on that mask:

    .. math::

        \hat A = \mathrm{softmax}\Big(\frac{(q W_c^q)\,\big((k W_c^k)^\top P_n\big)}{\sqrt{c}}\Big)\, U_n^\top,\qquad
        M_i = \mathrm{top}_{\mathrm{budget}}(\hat A_i),\qquad
        o_i = \mathrm{softmax}_{j \in M_i}(q_i \cdot k_j / \sqrt{D})\, v_j

    with channel projections ``W_c^{q,k}`` ``[D, c]`` (``c = D / reduce_c``, shared by the heads), a token
    down-projection ``P_n`` ``[N, n]`` (``n = N / reduce_n``) and a sparse up-projection basis ``U_n`` ``[N, n]``;
    ``budget = ceil(keep_rate N)``. The mask is not differentiated; the predictor is trained by
    :meth:`distillation_loss`, which distills the dense attention map into ``\hat A``:

    .. math::

        \mathcal{L}_{\mathrm{distill}} = \sum_{b, h, i, j} \big(\hat A_{b,h,i,j} - \mathrm{sg}[A_{b,h,i,j}]\big)^2,
        \qquad A = \mathrm{softmax}(q k^\top / \sqrt{D})

    (the authors' attention self-distillation / reconstruction loss: ``F.mse_loss(reduction="sum")`` against the
    unmasked attention of this layer, or of a teacher when ``teacher`` is given), over the rows of the non-class
    tokens when ``cls_token``.

    Shapes: ``x`` ``[B, N, C]`` with ``N = tokens`` (the token projections are sized for it) -> ``[B, N, C]``;
    heads ``[B, H, N, D]``.

    Args:
        dim, heads, kv_heads, head_dim, qkv_bias, out_bias, dropout: as
            :class:`~headwise.variants.base.ProjectedAttention` (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).
        tokens: the number of tokens ``N`` (required; e.g. 197 for ViT-B/16 at 224 px).
        keep_rate: fraction of keys each query keeps (default 0.25, the paper's main setting).
        reduce_n: token reduction of the predictor, ``n = max(1, N // reduce_n)`` (default 8).
        reduce_c: channel reduction of the predictor, ``c = max(1, D // reduce_c)`` (default 2).
        cls_token: token 0 is a class token whose row attends to every key, as in the authors' code (default True).

    Choices made here: the predictor logits are scaled by ``c^{-1/2}`` (the authors' code uses ``H^{-1/2}``); the
    basis is used as learned, without the inference-time magnitude threshold of the authors' code (a threshold of
    0, their default, only takes ``|U|``); ties in ``\hat A`` go to the lower key index. Token pruning, which the
    paper combines with this in some experiments, is not included.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("sparsifiner(tokens=50, keep_rate=0.2)", dim=64, heads=4)
        >>> x = torch.randn(2, 50, 64)
        >>> m(x).shape, m.distillation_loss(x).shape
        (torch.Size([2, 50, 64]), torch.Size([]))
    """

    capabilities = Capabilities(tokens=True, weights="method")
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2, "tokens": 9, "keep_rate": 0.3, "reduce_n": 2}

    @dataclass
    class Config(ProjectedAttention.Config):
        tokens: int | None = None  # the number of tokens N the predictor's token projections are sized for (required)
        keep_rate: float = 0.25  # fraction of keys kept per query: budget = ceil(keep_rate * N)
        reduce_n: int = 8  # token reduction of the predictor: n = max(1, N // reduce_n)
        reduce_c: int = 2  # channel reduction of the predictor: c = max(1, head_dim // reduce_c)
        cls_token: bool = True  # token 0 is a class token whose row attends to every key

        def __post_init__(self):
            super().__post_init__()
            if self.tokens is None:
                raise ValueError("sparsifiner needs tokens= (the fixed number of tokens N), got tokens=None")
            check_positive_int("tokens", self.tokens)
            self.keep_rate = check_number("keep_rate", self.keep_rate, 0, 1, low_open=True)
            check_positive_int("reduce_n", self.reduce_n)
            check_positive_int("reduce_c", self.reduce_c)
            check_bool("cls_token", self.cls_token)

    def build(self, cfg) -> None:
        super().build(cfg)
        N, D = cfg.tokens, cfg.head_dim
        n, c = max(1, N // cfg.reduce_n), max(1, D // cfg.reduce_c)
        self.proj_c_q = nn.Linear(D, c)
        self.proj_c_k = nn.Linear(D, c)
        self.proj_n = nn.Parameter(torch.randn(N, n) * 0.02)  # (N, n) token down-projection P_n
        self.basis = nn.Parameter(torch.randn(N, n) * 0.02)  # (N, n) up-projection basis U_n

    @property
    def budget(self) -> int:
        """Keys kept per query: ``ceil(keep_rate * tokens)``."""
        return math.ceil(self.config.keep_rate * self.config.tokens)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`ProjectedAttention.project`, checking that ``x`` has the ``tokens`` the predictor is sized for."""
        q, k, v = super().project(x, context)  # (B, H, N, D), 2 x (B, H_kv, N, D)
        if x.shape[1] != self.config.tokens:
            raise ValueError(f"sparsifiner is sized for tokens={self.config.tokens}, got x.shape={tuple(x.shape)}")
        return q, k, v

    def approx_attention(self, q: Tensor, k: Tensor) -> Tensor:
        """The predicted connectivity ``\\hat A`` ``[B, H, N, N]`` from q ``[B, H, N, D]``, k ``[B, H_kv, N, D]``."""
        qr = self.proj_c_q(q)  # (B, H, N, c)
        kr = self.proj_c_k(expand_heads(k, q.shape[1]))  # (B, H, N, c)
        kd = kr.transpose(-1, -2) @ self.proj_n  # (B, H, c, n)
        coef = torch.softmax(qr @ kd * qr.shape[-1] ** -0.5, dim=-1)  # (B, H, N, n)
        return coef @ self.basis.T  # (B, H, N, N)

    def connectivity_mask(self, q: Tensor, k: Tensor) -> Tensor:
        """The binarized connectivity ``[B, H, N, N]`` bool: each row's ``budget`` best predicted keys."""
        with torch.no_grad():
            mask = topk_mask(self.approx_attention(q, k), self.budget)  # (B, H, N, N)
        if self.config.cls_token:
            mask[:, :, 0] = True
        return mask

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Exact attention over the predicted connectivity (:func:`headwise.ops.topk.keep_attention`); the
        inherited :meth:`attention_weights` applies it to identity values (zero off the mask)."""
        return keep_attention(q, k, v, self.connectivity_mask(q, k))  # (B, H, N, D)

    def distillation_loss(self, x: Tensor, teacher: Tensor | None = None) -> Tensor:
        """``sum (\\hat A - sg[A])^2`` over batch, heads and (non-class) query rows; ``A`` is this layer's dense
        attention map, or ``teacher`` ``[B, H, N, N]`` (e.g. the same layer of a dense teacher model)."""
        q, k, _ = self.project(x)
        approx = self.approx_attention(q, k)  # (B, H, N, N)
        if teacher is None:
            teacher = torch.softmax(gqa_scores(q, k, self.head_dim ** -0.5), dim=-1)  # (B, H, N, N)
        elif not isinstance(teacher, Tensor) or teacher.shape != approx.shape:
            got = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
            raise ValueError(f"teacher must be an attention map [B, H, N, N] = {list(approx.shape)}, got {got}")
        rows = slice(1 if self.config.cls_token else 0, None)
        return (approx[:, :, rows] - teacher.detach()[:, :, rows]).pow(2).sum()
