"""Lightning Attention-2: causal linear attention with decay, tiled into blocks; forward and backward.

The sequence is cut into blocks of ``L`` tokens. Inside a block the output is the masked quadratic form (a small
dense matmul); across blocks it goes through the carried state ``S`` (``[D, Dv]`` per head), decayed by
``lambda^L`` per block. No cumulative sum over the sequence is formed: the only sequential step is the state
hand-off from one block to the next. For block ``c`` (tokens ``cL + t``, ``t < L``) reading ``S``, the state
after the previous block::

    O_c = s (Q_c K_c^T * M) V_c + s diag(lambda^(t+1)) Q_c S         M_ts = lambda^(t-s), t >= s (else 0)
    S  <- lambda^L S + (diag(lambda^(L-1-t)) K_c)^T V_c

The backward recomputes each unit from the inputs and the state the unit started from (saved by the forward, one
``[D, Dv]`` state per unit), walking the units from the end of the sequence. With ``A = s (Q K^T) * M`` and
``P = s (dO V^T) * M``::

    dQ = P K + s diag(lambda^(t+1)) dO S_read^T        S_read: the forward state each block reads
    dK = P^T Q + diag(lambda^(L-1-t)) V G_read^T        G_read: the gradient state carried back from the end,
    dV = A^T dO + diag(lambda^(L-1-t)) K G_read          G <- lambda^L G + s (diag(lambda^(t+1)) Q_c)^T dO_c

and the state ``G`` ends as the gradient of the initial state.

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

from headwise.ops.linear.base import apply_normalizer, check_linear_inputs, with_normalizer

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
            decay (plain causal linear attention). :func:`headwise.ops.linear.decay_rates` gives the papers' values.
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
        >>> from headwise.ops.linear import chunk_linear_attention, decay_rates
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
        Dv = v.shape[-1]
        plan = _Plan.make(B * H, N, min(block_size, N))
        tables = _DecayTables(lam, plan.L, H, q.dtype, q.device)
        state = _fresh_state(initial_state, (B, H, D, Dv), q)  # (B, H, D, Dv), updated in place
        o = q.new_empty(v.shape)  # (B, H, N, Dv)
        starts = q.new_empty(B * H, len(plan.pieces), D, Dv)  # the state each unit starts from, for the backward
        _forward(q, k, v, state, o, starts, tables, plan, scale)
        ctx.save_for_backward(q, k, v, starts)
        ctx.tables, ctx.plan, ctx.scale = tables, plan, scale
        return o, state

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dstate):
        q, k, v, starts = ctx.saved_tensors
        B, H, N, D = q.shape
        grad_state = _fresh_state(dstate, (B, H, D, v.shape[-1]), q)  # (B, H, D, Dv), ends as d initial_state
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _backward(q, k, v, do.contiguous(), starts, grad_state, dq, dk, dv, ctx.tables, ctx.plan, ctx.scale)
        needed = ctx.needs_input_grad
        return (dq if needed[0] else None, dk if needed[1] else None, dv if needed[2] else None,
                grad_state if needed[3] else None, None, None, None)


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
                        cast(carry), cast(hand), cast(start), reverse)


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
    reverse: bool  # anti-causal: the scan runs from the last block to the first

    def heads(self, index: Tensor) -> _Factors:
        """The factors of the heads ``index`` (a 1-D tensor of head numbers), in that order."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return _Factors(*(f[index.to(f.device)] if isinstance(f, Tensor) else f for f in values))


@dataclass(frozen=True)
class _Plan:
    """How the work is cut into units: groups of ``group`` consecutive heads (of ``G = B H``), each through
    ``pieces`` ``(first token, blocks, block length)`` in sequence order.

    A long sequence goes one head at a time through runs of ``_SEGMENT_TOKENS``: the block matrices of a unit are
    then views of the inputs and outputs (no copies) and its work stays in cache. Short sequences go several heads
    per unit (up to ``_GROUP_TOKENS`` tokens), whole, so that many heads do not mean many small calls. A last,
    shorter block is a piece of its own.
    """

    G: int
    L: int
    group: int
    pieces: tuple[tuple[int, int, int], ...]

    @staticmethod
    def make(G: int, N: int, L: int) -> _Plan:
        n_full, rest = divmod(N, L)
        if N <= _SEGMENT_TOKENS:
            group = max(1, min(G, _GROUP_TOKENS // N))
            pieces = [(0, n_full, L)] if n_full else []
        else:
            group = 1
            per = max(1, _SEGMENT_TOKENS // L)
            pieces = [(first * L, min(per, n_full - first), L) for first in range(0, n_full, per)]
        pieces += [(n_full * L, 1, rest)] if rest else []
        return _Plan(G, L, group, tuple(pieces))

    def groups(self):
        for g0 in range(0, self.G, self.group):
            yield g0, min(self.G, g0 + self.group)


def _unit(t: Tensor, g0: int, g1: int, piece: tuple[int, int, int]) -> Tensor:
    """The piece of heads ``g0:g1`` of ``t`` ``(G, N, X)`` as blocks, ``(1, G', n, l, X)`` (a view)."""
    start, n, l = piece
    return t[g0:g1, start:start + n * l].view(1, g1 - g0, n, l, t.shape[-1])


def _forward(q, k, v, state, o, starts, tables: _DecayTables, plan: _Plan, scale: float) -> None:
    """``o = s ((Q K^T) * M) V + s (decayed) Q S0``, unit by unit; ``state`` ends as the final state and ``starts``
    ``(G, pieces, D, Dv)`` holds the state each unit started from."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    G = B * H
    q2, k2, v2, o2 = q.view(G, N, D), k.view(G, N, D), v.view(G, N, Dv), o.view(G, N, Dv)
    factors = _FactorCache(tables, H, reverse=False, out_scale=scale, state_scale=1.0)
    work = _Workspace(q)
    for g0, g1 in plan.groups():
        state_u = state.view(G, D, Dv)[g0:g1][None]  # (1, G', D, Dv)
        for p, piece in enumerate(plan.pieces):
            starts[g0:g1, p].copy_(state_u[0])
            (o_u,), finish = _outputs([_unit(o2, g0, g1, piece)], work)
            _forward_unit(*(_unit(t, g0, g1, piece).contiguous() for t in (q2, k2, v2)), o_u, state_u,
                          factors.get(piece, g0, g1), work)
            finish()


def _backward(q, k, v, do, starts, grad_state, dq, dk, dv, tables: _DecayTables, plan: _Plan, scale: float) -> None:
    """The gradients of :func:`_forward`, unit by unit from the end of the sequence (each unit recomputed);
    ``grad_state`` starts as the gradient of the final state and ends as that of the initial state."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    G = B * H
    ins = (q.view(G, N, D), k.view(G, N, D), v.view(G, N, Dv), do.view(G, N, Dv))
    outs = (dq.view(G, N, D), dk.view(G, N, D), dv.view(G, N, Dv))
    causal = _FactorCache(tables, H, reverse=False, out_scale=scale, state_scale=1.0)
    anti = _FactorCache(tables, H, reverse=True, out_scale=1.0, state_scale=scale)
    work = _Workspace(q)
    for g0, g1 in plan.groups():
        grad_u = grad_state.view(G, D, Dv)[g0:g1][None]  # (1, G', D, Dv)
        for p in reversed(range(len(plan.pieces))):
            piece = plan.pieces[p]
            unit_outs, finish = _outputs([_unit(t, g0, g1, piece) for t in outs], work)
            _backward_unit(*(_unit(t, g0, g1, piece).contiguous() for t in ins), *unit_outs,
                           starts[g0:g1, p][None], grad_u, causal.get(piece, g0, g1), anti.get(piece, g0, g1), work)
            finish()


class _FactorCache:
    """:meth:`_DecayTables.factors` for one direction and scales, selected for the heads of each unit, cached."""

    def __init__(self, tables: _DecayTables, H: int, *, reverse: bool, out_scale: float, state_scale: float):
        self.tables, self.H, self.args = tables, H, (reverse, out_scale, state_scale)
        self.cache: dict[tuple, _Factors] = {}

    def get(self, piece: tuple[int, int, int], g0: int, g1: int) -> _Factors:
        _, n, l = piece
        key = (n, l, g0 % self.H, g1 - g0)
        if key not in self.cache:
            if (n, l) not in self.cache:
                self.cache[n, l] = self.tables.factors(n, l, *self.args)
            self.cache[key] = self.cache[n, l].heads(torch.arange(g0, g1) % self.H)
        return self.cache[key]


def _outputs(targets: list[Tensor], work: _Workspace):
    """Writable contiguous stand-ins for the unit views ``targets`` and a ``finish()`` that copies back the ones
    that are not the views themselves (several heads' pieces short of the whole sequence: short sequences only)."""
    bufs = [t if t.is_contiguous() else work.get(f"out{i}", t.shape) for i, t in enumerate(targets)]

    def finish():
        for t, buf in zip(targets, bufs):
            if buf is not t:
                t.copy_(buf)

    return bufs, finish


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


def _decayed(x: Tensor, factor: Tensor | None, work: _Workspace, name: str) -> Tensor:
    """``x * factor`` in a work buffer (``x`` itself when the factor is 1)."""
    return x if factor is None else torch.mul(x, factor, out=work.get(name, x.shape))


def _masked_scores(a: Tensor, b: Tensor, mask: Tensor, work: _Workspace, name: str) -> Tensor:
    """``(a b^T) * mask`` per block: a, b ``(Bu, Hu, n, l, X)`` -> ``(Bu, Hu, n, l, l)``."""
    Bu, Hu, n, l, X = a.shape
    scores = work.get(name, (Bu, Hu, n, l, l))
    torch.bmm(a.view(-1, l, X), b.view(-1, l, X).transpose(1, 2), out=scores.view(-1, l, l))
    return scores.mul_(mask)


def _states_read(b_dec: Tensor, c: Tensor, f: _Factors, state: Tensor, work: _Workspace, name: str, *,
                 advance: bool) -> Tensor:
    """The state each block of a unit reads, ``(Bu, Hu, n, Dk, Dc)``: the hand-offs ``b_dec^T c`` of the blocks
    before it in scan order (one small matmul, ``f.hand``) plus the decayed incoming ``state`` ``(Bu, Hu, Dk, Dc)``.
    With ``advance``, ``state`` then becomes (in place) the state after the unit."""
    Bu, Hu, n, l, Dk = b_dec.shape
    Dc = c.shape[-1]
    contrib = work.get(name + "-contrib", (Bu, Hu, n, Dk, Dc))  # each block's own hand-off
    torch.bmm(b_dec.view(-1, l, Dk).transpose(1, 2), c.view(-1, l, Dc), out=contrib.view(-1, Dk, Dc))
    read = work.get(name + "-read", (Bu, Hu, n, Dk, Dc))
    flat = read.view(Bu, Hu, n, Dk * Dc)
    torch.matmul(f.hand, contrib.view(Bu, Hu, n, Dk * Dc), out=flat)
    flat.addcmul_(f.start, state.reshape(Bu, Hu, 1, Dk * Dc))
    if advance:
        last = 0 if f.reverse else n - 1
        if f.carry is None:
            torch.add(read[:, :, last], contrib[:, :, last], out=state)
        else:
            torch.addcmul(contrib[:, :, last], read[:, :, last], f.carry, out=state)
    return read


def _forward_unit(q, k, v, o, state, f: _Factors, work: _Workspace) -> None:
    """One unit forward: q, k ``(Bu, Hu, n, l, D)``; v, o ``(Bu, Hu, n, l, Dv)``, all contiguous; ``state``
    ``(Bu, Hu, D, Dv)``, read and then overwritten with the state after the unit."""
    Bu, Hu, n, l, D = q.shape
    Dv = v.shape[-1]
    o3 = o.view(-1, l, Dv)
    # intra-block: the masked quadratic form
    torch.bmm(_masked_scores(q, k, f.mask, work, "scores").view(-1, l, l), v.view(-1, l, Dv), out=o3)
    # inter-block: the state each block reads, decayed to each of its tokens
    read = _states_read(_decayed(k, f.into, work, "k-dec"), v, f, state, work, "state", advance=True)
    o3.baddbmm_(_decayed(q, f.out, work, "q-dec").view(-1, l, D), read.view(-1, D, Dv))


def _backward_unit(q, k, v, do, dq, dk, dv, start, grad_state, fc: _Factors, fa: _Factors, work: _Workspace) -> None:
    """One unit backward. With ``A = s (Q K^T) * M`` and ``P = s (dO V^T) * M`` (``M`` the causal decay mask):

    * ``dQ = P K + s diag(lambda^(t+1)) dO S_read^T``: ``S_read`` the forward states, recomputed from ``start``;
    * ``dK = P^T Q + diag(lambda^(l-1-t)) V G_read^T`` and ``dV = A^T dO + diag(lambda^(l-1-t)) K G_read``:
      ``G_read`` the gradient states carried from the end of the sequence (``s q^T dO`` hand-offs), with
      ``grad_state`` advanced in place.

    ``fc``: causal factors (scale on the output); ``fa``: anti-causal factors (scale on the state).
    """
    Bu, Hu, n, l, D = q.shape
    Dv = v.shape[-1]
    dq3, dk3, dv3 = dq.view(-1, l, D), dk.view(-1, l, D), dv.view(-1, l, Dv)
    p = _masked_scores(do, v, fc.mask, work, "p").view(-1, l, l)  # dq_i gets sum_{j<=i} P_ij k_j
    torch.bmm(p, k.view(-1, l, D), out=dq3)
    torch.bmm(p.transpose(1, 2), q.view(-1, l, D), out=dk3)  # dk_i gets sum_{j>=i} P_ji q_j
    a = _masked_scores(q, k, fc.mask, work, "a").view(-1, l, l)
    torch.bmm(a.transpose(1, 2), do.view(-1, l, Dv), out=dv3)  # dv_i gets sum_{j>=i} A_ji do_j
    # token t reaches its block's end after l-1-t decays (fc.into = fa.out) and the state reaches token t after t+1
    # (fc.out = fa.into, times s)
    k_far = _decayed(k, fc.into, work, "k-far")
    s_read = _states_read(k_far, v, fc, start, work, "s", advance=False)  # (Bu, Hu, n, D, Dv)
    dq3.baddbmm_(_decayed(do, fc.out, work, "do-near").view(-1, l, Dv), s_read.view(-1, D, Dv).transpose(1, 2))
    g_read = _states_read(_decayed(q, fa.into, work, "q-near"), do, fa, grad_state, work, "g", advance=True)
    dv3.baddbmm_(k_far.view(-1, l, D), g_read.view(-1, D, Dv))
    dk3.baddbmm_(_decayed(v, fa.out, work, "v-far").view(-1, l, Dv), g_read.view(-1, D, Dv).transpose(1, 2))
