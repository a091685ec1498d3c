"""FlexAttention backend: the pattern's predicate as a ``mask_mod``, a block mask, ``flex_attention``.

On CUDA it runs compiled, forward and backward. On CPU, PyTorch's compiled FlexAttention is inference-only
(no backward, no log-sum-exp), so the backend declines CPU cases that need gradients or the lse. Block masks and the compiled function
are cached per (pattern, shape).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

from headwise.core.checks import default_scale
from headwise.patterns.base import Full, Pattern

__all__ = ["flex_attention", "can_run", "block_mask_for", "available"]


@lru_cache(maxsize=1)
def available() -> bool:
    try:
        from torch.nn.attention import flex_attention as _  # noqa: F401
    except Exception:
        return False
    return True


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


_CPU_MIN_LEN = 128


def can_run(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, return_lse: bool) -> bool:
    if not available():
        return False
    if q.device.type == "cpu":  # compiled Flex on CPU: forward only, no lse
        compiled = not os.environ.get("HEADWISE_FLEX_EAGER")
        # torch 2.13's compiled CPU kernel returned wrong rows for some sequences shorter than one 128-block
        # (N = 24 and 40 with 2 heads: off by 0.6 against SDPA, eager correct): decline those.
        short = compiled and min(q.shape[2], k.shape[2]) < _CPU_MIN_LEN
        return (not _needs_grad(q, k, v) and not (return_lse and compiled) and not short
                and q.dtype in (torch.float32, torch.bfloat16, torch.float16))
    return q.device.type == "cuda"


_BLOCK_MASKS: dict = {}


def block_mask_for(pattern: Pattern | None, n_q: int, n_kv: int, device, block_size: int = 128):
    """Cached ``create_block_mask`` for ``pattern`` (compiled construction for long sequences)."""
    from torch.nn.attention.flex_attention import create_block_mask

    pattern = Full() if pattern is None else pattern
    try:
        key = (pattern, n_q, n_kv, str(device), block_size)
        hash(key)
    except TypeError:
        key = (id(pattern), n_q, n_kv, str(device), block_size)
    bm = _BLOCK_MASKS.get(key)
    if bm is None:
        bm = create_block_mask(
            pattern.mask_mod(), B=None, H=pattern.heads, Q_LEN=n_q, KV_LEN=n_kv, device=device,
            BLOCK_SIZE=block_size, _compile=n_q * n_kv > (1 << 22),
        )
        if len(_BLOCK_MASKS) > 32:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = bm
    return bm


@lru_cache(maxsize=1)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, scale: float | None,
                   return_lse: bool, compile: bool | None = None):
    """Run FlexAttention; ``compile=None`` compiles unless ``HEADWISE_FLEX_EAGER=1`` (eager is for tests)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    if compile is None:
        compile = not os.environ.get("HEADWISE_FLEX_EAGER")
    bm = block_mask_for(pattern, q.shape[2], k.shape[2], q.device)
    fn = _compiled() if compile else flex
    kwargs = dict(block_mask=bm, scale=default_scale(q, scale), enable_gqa=k.shape[1] != q.shape[1])
    if not return_lse:  # compiled Flex on CPU cannot return the lse; rows with no key come back NaN there
        out = fn(q, k, v, **kwargs)
        return torch.nan_to_num(out, nan=0.0), None
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = fn(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    except ImportError:  # torch < 2.9
        out, lse = fn(q, k, v, return_lse=True, **kwargs)
    empty = lse == float("-inf")  # rows with no key: zeros, never NaN
    if bool(empty.any()):
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse
