"""DCAL's pair-wise cross-attention (registered as ``"pwca"``).

Zhu et al., CVPR 2022, "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification": a training-time regularizer in which an image's queries attend to the keys and values of itself
and of a distractor image. Softmax attention (:func:`headwise.attention` with the module's pattern) over the
concatenated keys; the reference is :func:`~headwise.variants.mha.naive_mha` with ``context = [x; pair]``. DCAL's
global-local cross-attention is :mod:`headwise.variants.glca`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from headwise.checks import check_tokens
from headwise.variants.base import Capabilities, SoftmaxAttention
from headwise.variants.registry import register

__all__ = ["PairwiseCrossAttention"]


@register("pwca")
class PairwiseCrossAttention(SoftmaxAttention):
    r"""Pair-wise Cross-Attention from "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and
    Object Re-Identification" (Zhu et al., CVPR 2022): a training-time regularizer in which the queries of one
    image attend to the keys and values of itself and of a distractor image:

    .. math::

        f_{PWCA}(Q_1, K_c, V_c) = \mathrm{softmax}\big(Q_1 K_c^\top / \sqrt{d}\big)\, V_c,\qquad
        K_c = [K_1; K_2],\; V_c = [V_1; V_2]

    The projections are those of self-attention (the paper shares PWCA's weights with the SA branch), so one
    module serves both: ``pair=None`` is plain self-attention, used at inference where PWCA is removed.

    Shapes: ``x`` ``[B, N, C]``, ``pair`` ``[B, M, C]`` (the other images; e.g. ``x[torch.randperm(B)]``) ->
    ``[B, N, C]``; inside, q is ``[B, H, N, D]``, k and v ``[B, H_kv, N + M, D]``.

    Args: as :class:`~headwise.variants.mha.MultiHeadAttention` (``dim``, ``heads``, ``kv_heads``, ``head_dim``,
    ``pattern``, ``causal``, ``qkv_bias``, ``out_bias``, ``dropout``, ``backend``); ``pattern`` and ``causal``
    apply to the ``N x (N + M)`` scores (key positions ``N ..`` are the pair's).

    Choices made here: how the pair is sampled (the paper: random image pairs from the training set) is left to
    the caller. Attending to ``pair = x`` gives exactly self-attention (every key appears twice, with the same
    weight), which the tests check. ``causal=True`` (an extension, for sequence tasks) masks keys after the
    query's position, so the pair's keys (positions ``>= N``) are never seen: PWCA is then self-attention.

    Example:
        >>> import torch, headwise
        >>> m = headwise.create("pwca", dim=64, heads=4)
        >>> x = torch.randn(4, 17, 64)
        >>> m(x, pair=x[torch.randperm(4)]).shape
        torch.Size([4, 17, 64])
    """

    capabilities = Capabilities(causal="optional", softmax=True)
    example_config = {"dim": 16, "heads": 4, "kv_heads": 2}

    def forward(self, x: Tensor, pair: Tensor | None = None) -> Tensor:
        """``x`` ``[B, N, C]`` attends to ``[x; pair]`` (``pair`` ``[B, M, C]``; itself alone when None)."""
        if pair is None:
            return self.finish(self.attend(*self.project(x)))  # (B, N, C)
        check_tokens("pair", pair, self.dim)
        return self.finish(self.attend(*self.project(x, torch.cat([x, pair], dim=1))))  # (B, N, C)
