"""What the three linear-attention implementations share: argument checks, decay rates and the normalizer.

The maths every implementation computes (one head; ``lambda`` the head's decay, ``s`` the scale)::

    S_i = lambda * S_{i-1} + k_i^T v_i          S_{-1} = initial state, [D, Dv]
    o_i = s * q_i S_i
        = s * sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j  +  s * lambda^(i+1) q_i S_{-1}

The final state is ``S_{N-1}``. With ``normalize=True`` the values get an extra column of ones, so the state
carries the normalizer ``z_i = sum_j lambda^(i-j) k_j`` in its last column (``[D, Dv + 1]``) and the output is
``o_i = s q_i S_i[:, :Dv] / (s q_i z_i + eps)`` (the scale cancels up to ``eps``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from headwise.core.checks import check_tensors

__all__ = ["decay_rates", "alibi_slopes", "NORMALIZER_EPS", "check_linear_inputs", "with_normalizer",
           "apply_normalizer"]

# added to the normalizer q_i . z_i, as in Katharopoulos et al. (2020)
NORMALIZER_EPS = 1e-6


def alibi_slopes(heads: int) -> list[float]:
    """The ALiBi head slopes (Press et al., 2022) that Lightning Attention uses as decay rates.

    For ``heads`` a power of two: ``2^(-8 h / H)`` for ``h = 1..H``; otherwise the slopes of the nearest smaller
    power of two followed by every other slope of the next larger one (the ALiBi recipe).
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads=!r}")
    if math.log2(heads).is_integer():
        start = 2.0 ** (-8.0 / heads)
        return [start ** (h + 1) for h in range(heads)]
    below = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(below) + alibi_slopes(2 * below)[0::2][: heads - below]


def decay_rates(heads: int, *, layer: int = 0, num_layers: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    """Per-head decay ``lambda_h`` of TransNormerLLM / Lightning Attention, shape ``(H,)``, values in (0, 1).

    ``lambda_h = exp(-s_h * r)`` with ``s_h`` the ALiBi slopes (:func:`alibi_slopes`) and the depth factor
    ``r = 1 - layer / (num_layers - 1) + 1e-5`` (``r = 1`` for a single layer): decay is strong in the first layer
    and nearly vanishes in the last. This is the formula of the official TransNormerLLM code; the paper writes
    ``lambda = exp(-(8h/H) (1 - l/L))``, a slightly different schedule (we follow the code).

    >>> decay_rates(8)[:2]            # exp(-1/2), exp(-1/4)
    tensor([0.6065, 0.7788], dtype=torch.float64)
    """
    for name, value in (("layer", layer), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {name}={value!r}")
    if num_layers < 1 or not 0 <= layer < num_layers:
        raise ValueError(f"need 0 <= layer < num_layers, got {layer=}, {num_layers=}")
    depth = 1.0 if num_layers == 1 else 1.0 - layer / (num_layers - 1) + 1e-5
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64)  # (H,)
    return torch.exp(-slopes * depth).to(dtype)


def check_linear_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | float | None,
    scale: float,
    normalize: bool,
    initial_state: Tensor | None,
) -> Tensor | None:
    """Validate the arguments of a linear-attention op; return the decay as a ``(H,)`` float64 tensor (or None).

    Clear errors name the argument and its value. The decay is a constant (the papers fix it): a decay that
    requires grad is refused rather than silently receiving no gradient.
    """
    check_tensors(q, k, v)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, H, N, D], got q.shape={tuple(q.shape)}, "
                         f"k.shape={tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, N, Dv] with the B, H, N of q, got q.shape={tuple(q.shape)}, "
                         f"v.shape={tuple(v.shape)}")
    if min(q.shape) < 1 or v.shape[-1] < 1:
        raise ValueError(f"empty dimension: q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale=!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize=!r}")
    B, H, _, D = q.shape
    if initial_state is not None:
        want = (B, H, D, v.shape[-1] + int(normalize))
        if not isinstance(initial_state, Tensor):
            raise TypeError(f"initial_state must be a torch.Tensor {list(want)} or None, got "
                            f"{type(initial_state).__name__}")
        if tuple(initial_state.shape) != want:
            extra = " (normalize=True adds the normalizer column)" if normalize else ""
            raise ValueError(f"initial_state must be [B, H, D, Dv{' + 1' if normalize else ''}] = {list(want)}{extra}, "
                             f"got initial_state.shape={tuple(initial_state.shape)}")
        if initial_state.dtype != q.dtype or initial_state.device != q.device:
            raise ValueError(f"initial_state must match q's dtype and device, got {initial_state.dtype=} on "
                             f"{initial_state.device}, {q.dtype=} on {q.device}")
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float, Tensor)):
        raise TypeError(f"decay must be a float, a (H,) tensor or None, got {type(decay).__name__}: {decay!r}")
    if isinstance(decay, Tensor):
        if decay.requires_grad:
            raise ValueError("decay must be a constant: decay.requires_grad=True is not supported "
                             "(the decay rates are fixed in Lightning Attention); pass decay.detach()")
        if decay.dim() == 0:
            decay = decay.reshape(1)
        if decay.dim() != 1 or decay.shape[0] not in (1, H):
            raise ValueError(f"decay must be a scalar or have one rate per head, shape ({H},), got "
                             f"decay.shape={tuple(decay.shape)}")
        lam = decay.detach().to(device="cpu", dtype=torch.float64).expand(H).clone()  # (H,)
    else:
        lam = torch.full((H,), float(decay), dtype=torch.float64)  # (H,)
    if not bool(((lam > 0) & (lam <= 1)).all()):
        raise ValueError(f"decay must lie in (0, 1] (lambda = 1 is no decay), got decay={lam.tolist()}")
    return lam


def with_normalizer(v: Tensor) -> Tensor:
    """``[v, 1]``: values with a column of ones, whose output is the normalizer ``q_i . z_i``. ``[B, H, N, Dv + 1]``."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)  # (B, H, N, Dv + 1)


def apply_normalizer(o_aug: Tensor) -> Tensor:
    """Divide the value columns of an output made with :func:`with_normalizer` by its last column (+ eps)."""
    return o_aug[..., :-1] / (o_aug[..., -1:] + NORMALIZER_EPS)  # (B, H, N, Dv)
