"""Lightning Attention-2: causal linear attention with decay, tiled into blocks; forward and backward.

The sequence is cut into blocks of ``L`` tokens. Inside a block the output is the masked quadratic form (a small
dense matmul); across blocks it goes through the carried state ``S`` (``[D, Dv]`` per head), decayed by
``lambda^L`` per block. No cumulative sum over the sequence is formed: the only sequential step is the state
hand-off from one block to the next. For block ``c`` (tokens ``cL + t``, ``t < L``) and ``P`` the state after
the previous block::

    O_c = s (Q_c K_c^T * M) V_c + s diag(lambda^(t+1)) Q_c P         M_ts = lambda^(t-s), t >= s (else 0)
    P  <- lambda^L P + (diag(lambda^(L-1-t)) K_c)^T V_c

The backward of linear attention is linear attention again, so it reuses the same block scan (no stored
intermediates; each block is recomputed):

* ``dQ`` is the causal scan of ``(dO, V, K)`` started from ``S0^T``;
* ``dV`` is the anti-causal scan of ``(K, Q, dO)`` and ``dK`` that of ``(V, dO, Q)``, started from the gradient
  of the returned final state; the state the first one ends with is the gradient of the initial state.

The blocks go in units (runs of up to ``_SEGMENT_TOKENS`` tokens of one head, or several whole short sequences):
each unit's block matrices are views of the inputs, every matmul is one batched call over the unit's blocks, the
state hand-offs between its blocks are one small matmul, work buffers are allocated once per call, and the
working set stays in cache: memory is bounded whatever ``N``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from headwise.linear.base import apply_normalizer, check_linear_inputs, with_normalizer

__all__ = ["chunk_linear_attention"]

# tokens of one head in one unit of work (at most 16 blocks of 64: the hand-off matmul stays small and the unit's
# work fits in cache), and the tokens of all heads in one unit when several short sequences go together
_SEGMENT_TOKENS = 1024
_GROUP_TOKENS = 8192


def chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | float | None = None,
    *,
    scale: float = 1.0,
    normalize: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    block_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    r"""Causal linear attention with per-head decay, Lightning Attention-2 tiling (Qin et al., 2024).

    From "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models"
    and "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention" (TransNormerLLM).
    For each head ``h`` with decay ``lambda_h``:

    .. math::

        O = s\,\big((Q K^\top) \odot M\big) V, \qquad M_{ij} = \lambda_h^{\,i-j}\ (i \ge j),\ 0\ (i < j)

    equivalently the recurrence ``S_i = lambda S_{i-1} + k_i^T v_i``, ``o_i = s q_i S_i``
    (:func:`recurrent_linear_attention`), computed here block by block in O(N) time and bounded work memory
    (independent of ``N``).

    Args:
        q, k: ``[B, H, N, D]`` queries and keys, already passed through the feature map (Lightning uses SiLU).
        v: ``[B, H, N, Dv]`` values.
        decay: per-head ``lambda`` in (0, 1], a ``(H,)`` tensor or one float for all heads; ``None`` or 1 is no
            decay (plain causal linear attention). :func:`headwise.linear.decay_rates` gives the papers' values.
            A constant: it receives no gradient.
        scale: ``s``, multiplies the scores. Default 1: the Lightning / TransNormerLLM convention (no scaling,
            the output is normalized by the layer's RMS norm afterwards). Pass ``D ** -0.5`` for the softmax /
            flash-linear-attention convention.
        normalize: divide by the normalizer, ``o_i = s q_i S_i / (s q_i z_i + eps)``, ``z_i = sum_j lambda^(i-j) k_j``,
            as in "Transformers are RNNs" (Katharopoulos et al., 2020; needs positive feature maps). Default
            False: Lightning Attention has no denominator (TransNormer, "The Devil in Linear Transformer", found
            it makes gradients unbounded and put a norm after the attention instead). With ``normalize=True`` states carry ``z`` as an extra last column.
        initial_state: ``[B, H, D, Dv]`` (``Dv + 1`` with ``normalize``) state ``S_{-1}`` carried from a previous
            call; default zeros.
        output_final_state: also return the state after the last token (to continue with another call or with
            :func:`recurrent_linear_attention` steps).
        block_size: tokens per block ``L`` (default 64). ``N`` need not be a multiple of it.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, H, N, Dv]``; ``final_state`` ``[B, H, D, Dv (+1)]`` or None when not
        requested. Float16/bfloat16 inputs are computed in float32 and returned in their dtype.

    Example:
        >>> import torch
        >>> from headwise.linear import chunk_linear_attention, decay_rates
        >>> q, k, v = (torch.randn(1, 8, 4096, 64).sigmoid() for _ in range(3))    # [B, H, N, D]
        >>> o, state = chunk_linear_attention(q, k, v, decay_rates(8), output_final_state=True)
        >>> o2, _ = chunk_linear_attention(q, k, v, decay_rates(8), initial_state=state)  # continue
    """
    lam = check_linear_inputs(q, k, v, decay, scale, normalize, initial_state)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size=!r}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {output_final_state=!r}")
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        initial_state = None if initial_state is None else initial_state.float()
    if normalize:
        v = with_normalizer(v)  # (B, H, N, Dv + 1)
    o, final = _ChunkLinearAttention.apply(q, k, v, initial_state, lam, float(scale), block_size)
    if normalize:
        o = apply_normalizer(o)
    return o.to(dtype), (final.to(dtype) if output_final_state else None)


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, lam, scale, block_size):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, N, D = q.shape
        state = _fresh_state(initial_state, (B, H, D, v.shape[-1]), q)  # (B, H, D, Dv), updated in place
        o = q.new_empty(v.shape)  # (B, H, N, Dv)
        tables = _DecayTables(lam, min(block_size, N), H, q.dtype, q.device)
        _scan(q, k, v, state, tables, out_scale=scale, state_scale=1.0, reverse=False, out=o)
        ctx.save_for_backward(q, k, v, initial_state)
        ctx.lam, ctx.scale, ctx.block_size = lam, scale, block_size
        return o, state

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dstate):
        q, k, v, initial_state = ctx.saved_tensors
        B, H, N, D = q.shape
        Dv = v.shape[-1]
        do = do.contiguous()
        tables = _DecayTables(ctx.lam, min(ctx.block_size, N), H, q.dtype, q.device)
        dq = dk = dv = dstate0 = None
        if ctx.needs_input_grad[0]:
            # dq_i = s sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + s lambda^(i+1) do_i S0^T
            start = _fresh_state(None if initial_state is None else initial_state.transpose(-1, -2), (B, H, Dv, D), q)
            dq = torch.empty_like(q)
            _scan(do, v, k, start, tables, out_scale=ctx.scale, state_scale=1.0, reverse=False, out=dq)
        # dS_i = s sum_{j>=i} lambda^(j-i) q_j^T do_j + lambda^(N-1-i) dS_final; dv_i = k_i dS_i, dk_i = v_i dS_i^T
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_state = _fresh_state(dstate, (B, H, D, Dv), q)
            dv = torch.empty_like(v)
            _scan(k, q, do, grad_state, tables, out_scale=1.0, state_scale=ctx.scale, reverse=True, out=dv)
            dstate0 = grad_state if ctx.needs_input_grad[3] else None  # lambda dS_0: the initial state's gradient
        if ctx.needs_input_grad[1]:
            grad_state_t = _fresh_state(None if dstate is None else dstate.transpose(-1, -2), (B, H, Dv, D), q)
            dk = torch.empty_like(k)
            _scan(v, do, q, grad_state_t, tables, out_scale=1.0, state_scale=ctx.scale, reverse=True, out=dk)
        return dq, dk, dv, dstate0, None, None, None


def _fresh_state(init: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A new contiguous state buffer (the scans update it in place): a copy of ``init``, or zeros."""
    if init is None:
        return like.new_zeros(shape)
    return init.clone(memory_format=torch.contiguous_format)


class _DecayTables:
    """Decay powers for blocks of ``L`` tokens, per head, built in float64.

    ``pow_next[h, t] = lambda_h^(t+1)``, ``pow_rest[h, t] = lambda_h^(L-1-t)``, ``intra[h, t, s] = lambda_h^(t-s)``
    for ``t >= s`` else 0. A shorter (last) block of ``l`` tokens uses ``pow_next[:, :l]``, ``pow_rest[:, L-l:]``
    and ``intra[:, :l, :l]``. With no decay the powers are None (all ones: the multiplications are skipped).
    """

    def __init__(self, lam: Tensor | None, L: int, H: int, dtype: torch.dtype, device: torch.device):
        self.L, self.H, self.dtype, self.device = L, H, dtype, device
        t = torch.arange(L, dtype=torch.float64)
        dist = t[:, None] - t[None, :]  # (L, L) t - s
        causal = (dist >= 0).to(torch.float64)
        if lam is None or bool((lam == 1).all()):
            self.log_lam = None
            self.pow_next = self.pow_rest = None
            self.intra = causal[None].expand(H, L, L)  # (H, L, L)
        else:
            self.log_lam = lam.log()  # (H,)
            self.pow_next = torch.exp(self.log_lam[:, None] * (t + 1))  # (H, L)
            self.pow_rest = torch.exp(self.log_lam[:, None] * (L - 1 - t))  # (H, L)
            self.intra = torch.exp(self.log_lam[:, None, None] * dist.clamp(min=0)) * causal  # (H, L, L)

    def factors(self, blocks: int, length: int, reverse: bool, out_scale: float, state_scale: float) -> _Factors:
        """The factors of a run of ``blocks`` blocks of ``length`` tokens (see :class:`_Factors`)."""
        L, H, n, l = self.L, self.H, blocks, length
        mask = self.intra[:, :l, :l]
        if reverse:
            mask = mask.transpose(-1, -2)
        mask = (mask * (out_scale * state_scale))[:, None]  # (H, 1, l, l)
        # block j reads the state after the blocks before it: the hand-off of block j' < j reaches it after
        # p(j) - p(j') - 1 further blocks (p the position in scan order), the state before the run after p(j)
        p = torch.arange(n, dtype=torch.float64)
        if reverse:
            p = p.flip(0)
        gap = p[:, None] - p[None, :] - 1  # (n, n)
        if self.log_lam is None:
            near = far = carry = None
            hand = (gap >= 0).to(torch.float64).expand(H, n, n)  # (H, n, n)
            start = torch.ones(H, n, 1, dtype=torch.float64)  # (H, n, 1)
        else:
            near = self.pow_next[:, :l]  # (H, l) lambda^(t+1)
            far = self.pow_rest[:, L - l:]  # (H, l) lambda^(l-1-t)
            log_carry = self.log_lam * l  # (H,) one block's decay, lambda^l
            carry = log_carry.exp()[:, None, None]  # (H, 1, 1)
            hand = torch.exp(log_carry[:, None, None] * gap.clamp(min=0)) * (gap >= 0)  # (H, n, n)
            start = torch.exp(log_carry[:, None, None] * p[:, None])  # (H, n, 1)
        # causal: the state reaches token t after t+1 decays and token t reaches the block's end after l-1-t;
        # anti-causal: the mirror image
        out_pow, into_pow = (far, near) if reverse else (near, far)

        def per_token(powers, s):
            if powers is None:
                return None if s == 1.0 else torch.full((H, 1, l, 1), s, dtype=torch.float64)
            return (powers * s)[:, None, :, None]  # (H, 1, l, 1)

        cast = lambda x: None if x is None else x.to(self.device, self.dtype)
        return _Factors(cast(mask), cast(per_token(out_pow, out_scale)), cast(per_token(into_pow, state_scale)),
                        cast(carry), cast(hand), cast(start))


@dataclass
class _Factors:
    """Broadcastable decay factors of a run of ``n`` blocks of ``l`` tokens, for ``H`` heads (or some: :meth:`heads`).

    mask ``(H, 1, l, l)``: intra-block decay (lower triangle; upper for the anti-causal scan), times both scales.
    out ``(H, 1, l, 1)``: from the carried state to each token's output, times ``out_scale``. into
    ``(H, 1, l, 1)``: from each token to the state handed on, times ``state_scale``. carry ``(H, 1, 1)``: one
    block's decay. hand ``(H, n, n)`` and start ``(H, n, 1)``: the state block ``j`` reads is
    ``sum_j' hand[j, j'] contribution[j'] + start[j] * state``. Factors equal to 1 are None.
    """

    mask: Tensor
    out: Tensor | None
    into: Tensor | None
    carry: Tensor | None
    hand: Tensor
    start: Tensor

    def heads(self, index: Tensor) -> _Factors:
        """The factors of the heads ``index`` (a 1-D tensor of head numbers), in that order."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return _Factors(*(None if f is None else f[index.to(f.device)] for f in values))


def _scan(a: Tensor, b: Tensor, c: Tensor, state: Tensor, tables: _DecayTables, *, out_scale: float,
          state_scale: float, reverse: bool, out: Tensor) -> None:
    """``out_i = s_out s_state sum_{j <= i} lambda^(i-j) (a_i . b_j) c_j + s_out lambda^(i+1) a_i state``
    (``j >= i`` and ``lambda^(N-1-i)`` when ``reverse``) block by block; ``state`` (in place) ends as the state after
    the sequence (before it, when ``reverse``).

    a, b: ``[B, H, N, Dk]`` contiguous; c, out: ``[B, H, N, Dc]`` contiguous; state: ``[B, H, Dk, Dc]``.

    The work goes in units of consecutive heads and consecutive blocks. A long sequence goes one head at a time
    through runs of ``_SEGMENT_TOKENS``: the block matrices of a unit are then views of the inputs and outputs
    (no copies) and its work stays in cache. Short sequences go several heads per unit (up to
    ``_GROUP_TOKENS`` tokens), whole, so that many heads do not mean many small calls.
    """
    B, H, N, Dk = a.shape
    Dc = c.shape[-1]
    L = tables.L
    G = B * H
    n_full, rest = divmod(N, L)
    if N <= _SEGMENT_TOKENS:
        group = max(1, min(G, _GROUP_TOKENS // N))
        pieces = [(0, n_full, L)] if n_full else []
    else:
        group = 1
        per = max(1, _SEGMENT_TOKENS // L)
        pieces = [(first * L, min(per, n_full - first), L) for first in range(0, n_full, per)]
    pieces += [(n_full * L, 1, rest)] if rest else []  # the last, shorter block
    if reverse:
        pieces.reverse()
    work = _Workspace(a)
    cache: dict[tuple[int, int, int, int], _Factors] = {}

    def factors(n: int, l: int, g0: int, g1: int) -> _Factors:
        key = (n, l, g0 % H, g1 - g0)
        if key not in cache:
            if (n, l) not in cache:
                cache[n, l] = tables.factors(n, l, reverse, out_scale, state_scale)
            cache[key] = cache[n, l].heads(torch.arange(g0, g1) % H)
        return cache[key]

    a2, b2, c2, o2 = a.view(G, N, Dk), b.view(G, N, Dk), c.view(G, N, Dc), out.view(G, N, Dc)
    for g0 in range(0, G, group):
        g1 = min(G, g0 + group)
        state_u = state.view(G, Dk, Dc)[g0:g1][None]  # (1, G', Dk, Dc)
        for start, n, l in pieces:
            unit = lambda t: t[g0:g1, start:start + n * l].view(1, g1 - g0, n, l, t.shape[-1])  # (1, G', n, l, *)
            o_u = unit(o2)
            # several heads' runs short of the whole sequence are not contiguous: copy (short sequences only)
            o_w = o_u if o_u.is_contiguous() else work.get("o", o_u.shape)
            _scan_unit(unit(a2).contiguous(), unit(b2).contiguous(), unit(c2).contiguous(), o_w, state_u,
                       factors(n, l, g0, g1), reverse, work)
            if o_w is not o_u:
                o_u.copy_(o_w)


class _Workspace:
    """Work buffers reused across units: ``get(name, shape)`` returns the same tensor for the same name and shape."""

    def __init__(self, like: Tensor):
        self.like = like
        self.buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, shape) -> Tensor:
        key = (name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = self.like.new_empty(key[1])
        return self.buffers[key]


def _scan_unit(a, b, c, o, state, f: _Factors, reverse: bool, work: _Workspace) -> None:
    """One run of ``n`` blocks of ``l`` tokens: a, b ``(Bu, Hu, n, l, Dk)``; c, o ``(Bu, Hu, n, l, Dc)``, all
    contiguous; ``state`` ``(Bu, Hu, Dk, Dc)``, read and then overwritten with the state after the run."""
    Bu, Hu, n, l, Dk = a.shape
    Dc = c.shape[-1]
    G = Bu * Hu * n  # the batch of the block matmuls
    o3, c3 = o.view(G, l, Dc), c.view(G, l, Dc)
    # intra-block: the masked quadratic form
    scores = work.get("scores", (Bu, Hu, n, l, l))
    torch.bmm(a.view(G, l, Dk), b.view(G, l, Dk).transpose(1, 2), out=scores.view(G, l, l))
    scores.mul_(f.mask)  # (Bu, Hu, n, l, l)
    torch.bmm(scores.view(G, l, l), c3, out=o3)
    # each block's own contribution to the state it hands on: (decayed b)^T c
    tmp = work.get("tmp", (Bu, Hu, n, l, Dk))
    b_dec = b if f.into is None else torch.mul(b, f.into, out=tmp)  # (Bu, Hu, n, l, Dk)
    contrib = work.get("contrib", (Bu, Hu, n, Dk, Dc))
    torch.bmm(b_dec.view(G, l, Dk).transpose(1, 2), c3, out=contrib.view(G, Dk, Dc))
    # the state each block reads, all at once: hand-offs of the earlier blocks plus the decayed incoming state
    before = work.get("before", (Bu, Hu, n, Dk, Dc))
    flat = before.view(Bu, Hu, n, Dk * Dc)
    torch.matmul(f.hand, contrib.view(Bu, Hu, n, Dk * Dc), out=flat)
    flat.addcmul_(f.start, state.reshape(Bu, Hu, 1, Dk * Dc))
    last = 0 if reverse else n - 1
    if f.carry is None:
        torch.add(before[:, :, last], contrib[:, :, last], out=state)
    else:
        torch.addcmul(contrib[:, :, last], before[:, :, last], f.carry, out=state)
    # inter-block: the state each block reads, decayed to each of its tokens
    a_dec = a if f.out is None else torch.mul(a, f.out, out=tmp)  # (Bu, Hu, n, l, Dk)
    o3.baddbmm_(a_dec.view(G, l, Dk), before.view(G, Dk, Dc))
