"""Ring attention: the sequence sharded over ranks, key/value shards passed around the ring.

Ring Attention (Liu, Zaharia and Abbeel, 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context"; the context-parallel attention of "A Unified View of Long-Sequence Models towards Modeling
Million-Scale Dependencies"). Rank ``r`` of ``P`` holds the queries, keys and values of its shard (see
:mod:`headwise.distributed.sharding`). In ``P`` steps every key/value shard visits every rank: at step ``s``
rank ``r`` holds the keys of rank ``(r - s) mod P``, computes attention of its queries against them with the
block-sparse engine, which returns each row's log-sum-exp, and merges the partial result into its running one
with the log-sum-exp merge (:func:`headwise.merge_attention`)::

    out_r = sum_s exp(lse_{r,s} - L_r) out_{r,s},    L_r = logsumexp_s lse_{r,s}

The next shard is sent and received (``isend``/``irecv``) while the current one is computed on.

Backward (a second ring): with the global ``L`` and ``delta = rowsum(dO * O)``, the gradient of every shard
pair is the engine's FlashAttention-style backward of that pair run with ``lse = L`` (``P_ij = exp(s_ij - L_i)``,
``dS = P * (dO V^T - delta)``); ``dQ`` accumulates locally; the ``dK``/``dV`` accumulator of a shard starts on
the first rank after its owner, travels with the shard, and returns from the last rank that needs it straight to
the owner, who adds its own part. Full attention: each rank sends ``P - 1`` key/value shards forward and
``2 (P - 1)`` key/value-sized messages backward.

Patterns: any :class:`headwise.patterns.Pattern` on the global positions. The chunk-level schedule of the
pattern (which chunk pairs are empty, partial or full) decides the work: a rank skips a step whose shard pair
has no attended pair (no compute), and a key/value shard is sent onward only while some later rank on the ring
needs it (no transfer when no rank does); its gradient accumulator then returns directly to its owner. With
the zigzag layout, causal attention gives every rank the same number of attended pairs. Full chunk pairs run
unmasked; partial ones run with the pattern restricted to the pair (``Causal`` with an offset, or the pattern
seen through the pair's global offsets, whose engine schedule is derived from the predicate and cached).

Choices: self-attention only (queries and keys share the sequence and its layout); the engine is always the
block-sparse one (fused kernel on CPU, PyTorch executor elsewhere), as it returns the log-sum-exp the merge
needs; float16/bfloat16 inputs are merged and accumulated in float32.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from headwise.core.blocksparse import pattern_key, use_kernel, blocksparse_attention, extension, make_plan
from headwise.core.checks import check_qkv, default_scale, lse_dtype
from headwise.core.merge import merge_attention
from headwise.distributed.sharding import ShardLayout, comm_error, layout_for, nbytes, record_communication, world_and_rank
from headwise.patterns.base import Causal, Full, Pattern, uniform_bounds

__all__ = ["ring_attention", "RingPlan", "ring_plan", "pair_backward", "OffsetPattern", "P2P", "check_global"]


# ---- the pattern on one chunk pair ----------------------------------------------------------------------
@dataclass(frozen=True)
class OffsetPattern(Pattern):
    """``pattern`` seen from a chunk pair: local query ``i`` and key ``j`` are global ``q0 + i`` and ``k0 + j``.

    Its tile schedule is the base class's, derived from the predicate (O(n_q n_kv) once per chunk pair; cached
    by the engine's plan cache)."""

    pattern: Pattern  # the pattern on global positions
    q0: int  # global position of local query 0
    k0: int  # global position of local key 0

    def __post_init__(self):
        object.__setattr__(self, "heads", self.pattern.heads)

    def mask(self, q_idx, kv_idx, head=None):
        return self.pattern.mask(q_idx + self.q0, kv_idx + self.k0, head)


def chunk_states(pattern: Pattern | None, lay: ShardLayout) -> Tensor:
    """``(n_chunks, n_chunks)`` int8 state of each (query chunk, key chunk): 0 empty, 1 partial, 2 full (over all
    heads: empty if empty in every head, full if full in every head). Chunks made only of padding are empty."""
    n, c, n_chunks = lay.seq_len, lay.chunk, lay.n_chunks
    if pattern is None or isinstance(pattern, Full):
        real = torch.zeros(n_chunks, dtype=torch.int8)
        real[: -(-n // c)] = 1
        return (real[:, None] * real[None, :]) * 2
    bounds = uniform_bounds(n, c)
    heads = [None] if pattern.heads is None else range(pattern.heads)
    per_head = []
    for h in heads:
        s = pattern.tile_schedule(n, n, c, c, head=h)
        if not (s.q_perm is None and s.kv_perm is None and torch.equal(s.q_bounds, bounds)
                and torch.equal(s.kv_bounds, bounds)):  # a permuted or custom tiling: evaluate on the chunks
            s = pattern.exhaustive_schedule(n, n, head=h, q_bounds=bounds, kv_bounds=bounds)
        per_head.append(s.tile_states())
    st = torch.stack(per_head)  # (heads, real chunks, real chunks)
    merged = torch.where((st == 2).all(0), 2, torch.where((st > 0).any(0), 1, 0)).to(torch.int8)
    out = torch.zeros(n_chunks, n_chunks, dtype=torch.int8)
    out[: merged.shape[0], : merged.shape[1]] = merged
    return out


@dataclass(frozen=True, eq=False)
class RingPlan:
    """What every rank computes and sends, identical on all ranks (derived from the pattern and the layout).

    ``tasks[r][o]``: the chunk pairs rank ``r`` computes against the keys of rank ``o``, as
    ``(q_chunk, q_len, kv_chunk, kv_len, pattern_or_None)``: the chunk's index within its shard (0, or 1 for the
    second zigzag chunk), its real tokens, and the pattern of the pair (``None``: full pair).
    ``need[r, o]``: rank ``r`` has work with the keys of rank ``o``. ``last[o]``: the last ring step at which
    shard ``o`` is needed (``max s`` with ``need[(o + s) % P, o]``; 0 when only its owner or nobody needs it):
    shard ``o`` is sent onward at steps ``s < last[o]`` only.
    """

    layout: ShardLayout
    tasks: tuple[tuple[tuple[tuple[int, int, int, int, Pattern | None], ...], ...], ...]
    need: Tensor  # (P, P) bool
    last: tuple[int, ...]  # (P,)


def _pair_pattern(pattern: Pattern | None, state: int, q0: int, k0: int) -> Pattern | None:
    if state == 2 or pattern is None:
        return None
    if isinstance(pattern, Causal):  # analytic: k0 + j <= q0 + i + offset
        return Causal(pattern.offset + q0 - k0)
    return OffsetPattern(pattern, q0, k0)


def build_ring_plan(pattern: Pattern | None, lay: ShardLayout) -> RingPlan:
    states = chunk_states(pattern, lay)
    P = lay.world
    tasks = []
    for r in range(P):
        row = []
        for o in range(P):
            pairs = []
            for qi, (q0, ql, _) in enumerate(lay.chunks(r)):
                for ki, (k0, kl, _) in enumerate(lay.chunks(o)):
                    st = int(states[q0 // lay.chunk, k0 // lay.chunk]) if ql and kl else 0
                    if st:
                        pairs.append((qi, ql, ki, kl, _pair_pattern(pattern, st, q0, k0)))
            row.append(tuple(pairs))
        tasks.append(tuple(row))
    need = torch.tensor([[bool(tasks[r][o]) for o in range(P)] for r in range(P)])
    last = tuple(max([s for s in range(P) if need[(o + s) % P, o]], default=0) for o in range(P))
    return RingPlan(lay, tuple(tasks), need, last)


_PLANS: OrderedDict = OrderedDict()
_PLANS_LOCK = threading.Lock()


def ring_plan(pattern: Pattern | None, lay: ShardLayout) -> RingPlan:
    """Cached :func:`build_ring_plan` (keyed like the engine's plans: by value when the pattern is hashable)."""
    key = (None if pattern is None else pattern_key(pattern), lay)
    with _PLANS_LOCK:
        if key in _PLANS:
            _PLANS.move_to_end(key)
            return _PLANS[key]
    plan = build_ring_plan(pattern, lay)
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > 32:
            _PLANS.popitem(last=False)
    return plan


# ---- point-to-point with clear errors ------------------------------------------------------------------
class P2P:
    """Point-to-point transfers on a group: queued ``isend``/``irecv`` posted together by :meth:`start`
    (``batch_isend_irecv``, which NCCL needs when two ranks send to each other at once; tags for gloo),
    communication counting, and errors that say what failed.

    Waits fail after the process group's timeout (``init_process_group(timeout=...)``) or as soon as the peer's
    connection drops (a crashed rank); the error names this rank, the peer and the step."""

    def __init__(self, group, op: str):
        self.world, self.rank = world_and_rank(group)
        self.group, self.op = group, op
        self.queue: list = []  # (P2POp, list receiving its work, description, step)
        self.sends: list = []  # (work, tensor kept alive, description, step)

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group if self.group is not None else dist.group.WORLD, r)

    def send(self, tensors: list[Tensor], to: int, tag: int, what: str, step: int) -> None:
        """Queue sends of ``tensors`` to group rank ``to`` (posted by :meth:`start`)."""
        for i, t in enumerate(tensors):
            t = t.contiguous()
            holder: list = []
            self.queue.append((dist.P2POp(dist.isend, t, self._global(to), self.group, tag + i), holder,
                               f"sending {what} to rank {to}", step))
            self.sends.append((holder, t, f"sending {what} to rank {to}", step))
            record_communication(nbytes(t), 0)

    def recv(self, likes: list[Tensor], frm: int, tag: int, what: str, step: int):
        """Queue receives into new buffers shaped like ``likes`` (only their shape, dtype and device are used);
        returns ``(buffers, pending)`` for :meth:`wait`."""
        bufs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in likes]
        holder: list = []
        for i, b in enumerate(bufs):
            self.queue.append((dist.P2POp(dist.irecv, b, self._global(frm), self.group, tag + i), holder,
                               f"receiving {what} from rank {frm}", step))
        record_communication(0, sum(nbytes(b) for b in bufs), 0)
        return bufs, (holder, f"receiving {what} from rank {frm}", step)

    def start(self) -> None:
        """Post every queued transfer at once."""
        if not self.queue:
            return
        queue, self.queue = self.queue, []
        with self._guard(queue[0][2] + (f" (and {len(queue) - 1} more transfers)" if len(queue) > 1 else ""),
                         queue[0][3]):
            works = dist.batch_isend_irecv([op for op, *_ in queue])
        for (_, holder, _, _), work in zip(queue, works):
            holder.append(work)

    def wait(self, pending) -> None:
        self.start()
        works, doing, step = pending
        with self._guard(doing, step):
            for w in works:
                w.wait()

    def wait_sends(self) -> None:
        self.start()
        for works, _, doing, step in self.sends:
            with self._guard(doing, step):
                for w in works:
                    w.wait()
        self.sends.clear()

    @contextmanager
    def _guard(self, doing: str, step: int):
        try:
            yield
        except RuntimeError as e:
            raise comm_error(self.op, self.group, f"{doing} at ring step {step}", e) from e


def check_global(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, seq_len: int) -> None:
    """The checks of :func:`headwise.attention` on the full sequence the shards come from (shapes only)."""
    full = lambda t: torch.empty((1, t.shape[1], seq_len, t.shape[3]), dtype=t.dtype, device="meta")  # noqa: E731
    check_qkv(full(q), full(k), full(v), pattern, None)


def _tag(step: int, kind: int) -> int:
    """Message tags: 8 per ring step, 4 for the k/v chunks (kind 0), 4 for their gradients (kind 1); the
    gradients' return trip to their owner uses step = P."""
    return 8 * step + 4 * kind


# ---- the local pieces: one chunk pair ------------------------------------------------------------------
def pair_backward(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, lse: Tensor, delta: Tensor,
                  pattern: Pattern | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention restricted to one key subset, given the softmax statistics of the whole row.

    ``lse`` ``[B, H, N]`` is the log-sum-exp over all keys of each row (not only this subset) and
    ``delta = rowsum(dO * O)`` with the full output ``O``; then the pair's ``(dq, dk, dv)`` are its exact share
    of the gradient of the full attention. On CPU with the engine's kernel (float32/64, a shared schedule in
    token order) this is the kernel's backward run with ``lse``; otherwise the same quantity by autograd through
    the engine: the gradient of ``sum_i exp(lse_b,i - lse_i) (o_b,i . dO_i - delta_i)``, whose derivative with
    respect to each score is ``P_ij (dO_i . v_j - delta_i)``.
    """
    lse_safe = lse.masked_fill(torch.isinf(lse), -1e30)  # rows with no key anywhere: every p_ij is 0
    heads_free = pattern is None or pattern.heads is None
    if use_kernel(q) and heads_free and q.dtype in (torch.float32, torch.float64):
        plan = make_plan(pattern, q.shape[2], k.shape[2], device=q.device)
        s = plan.schedule
        if s.q_perm is None and s.kv_perm is None:
            return tuple(extension().backward(
                q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), lse_safe.to(q.dtype).contiguous(),
                delta.to(q.dtype).contiguous(), s.q_bounds, s.kv_bounds, s.kv_tiles, plan.part_idx, plan.part_mask,
                scale))
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        o, l = blocksparse_attention(qq, kk, vv, pattern, scale, True)  # (B, H, N, Dv), (B, H, N)
        w = torch.exp(l - lse_safe)  # (B, H, N) this subset's share of each row's softmax mass
        surrogate = (w * ((o.to(w.dtype) * dout.to(w.dtype)).sum(-1) - delta)).sum()
        return torch.autograd.grad(surrogate, (qq, kk, vv), allow_unused=True, materialize_grads=True)


def _chunks(t: Tensor, lay: ShardLayout) -> list[Tensor]:
    """The shard's chunks as contiguous ``[B, H, c, D]`` tensors (one copy, so that no pair copies a slice)."""
    return [t.narrow(2, j * lay.chunk, lay.chunk).contiguous() for j in range(lay.chunks_per_rank)]


def _views(t: Tensor, lay: ShardLayout) -> list[Tensor]:
    """The shard's chunks as views of ``t`` (dim 2)."""
    return [t.narrow(2, j * lay.chunk, lay.chunk) for j in range(lay.chunks_per_rank)]


def _real(t: Tensor, n: int) -> Tensor:
    return t if n == t.shape[2] else t.narrow(2, 0, n)


class _RingAttention(torch.autograd.Function):
    """Forward and backward rings on chunk lists: ``kv`` is ``[k chunks..., v chunks...]``, the gradient
    accumulators ``[dk chunks..., dv chunks...]``; at most the current and the incoming of each are alive."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, group, scale: float):
        lay = plan.layout
        p2p = P2P(group, "ring_attention")
        P, r, m = p2p.world, p2p.rank, lay.chunks_per_rank
        acc = lse_dtype(q.dtype)
        qc = _views(q, lay)  # m x (B, H, c, D) views: the engine copies a pair's queries only while it runs
        out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=acc)  # (B, H, n, Dv), padded rows stay 0
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)  # (B, H, n)
        outs, lses = _views(out, lay), _views(lse, lay)  # m x (B, H, c, Dv), m x (B, H, c)
        kv = _chunks(k, lay) + _chunks(v, lay)  # 2m x (B, H_kv, c, D or Dv)
        like = [t.new_empty((1,) * t.dim()).expand(t.shape) for t in kv]  # shapes of the k/v chunks, no storage
        for s in range(P):
            o, nxt = (r - s) % P, (r - s - 1) % P
            incoming = None
            if s < plan.last[nxt]:  # shard nxt moves from rank r - 1 to us after this step
                incoming = p2p.recv(like, (r - 1) % P, _tag(s, 0), f"k/v of rank {nxt}", s)
            if s < plan.last[o]:
                p2p.send(kv, (r + 1) % P, _tag(s, 0), f"k/v of rank {o}", s)
            p2p.start()
            for qi, ql, ki, kl, pat in plan.tasks[r][o]:  # overlaps with the transfers just posted
                o_b, l_b = blocksparse_attention(_real(qc[qi], ql), _real(kv[ki], kl), _real(kv[m + ki], kl), pat,
                                                 scale, True)  # (B, H, ql, Dv), (B, H, ql)
                merged, merged_lse = merge_attention(_real(outs[qi], ql), _real(lses[qi], ql), o_b, l_b)
                _real(outs[qi], ql).copy_(merged)
                _real(lses[qi], ql).copy_(merged_lse)
            kv = None
            if incoming is not None:
                p2p.wait(incoming[1])
                kv = incoming[0]
            p2p.wait_sends()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.group, ctx.scale = plan, group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        lay = plan.layout
        p2p = P2P(ctx.group, "ring_attention backward")
        P, r, m = p2p.world, p2p.rank, lay.chunks_per_rank
        acc = lse_dtype(q.dtype)
        dout = dout.to(acc)
        qc, dc = _views(q, lay), _views(dout, lay)  # m x (B, H, c, D), m x (B, H, c, Dv)
        lc = _views(lse, lay)  # m x (B, H, c)
        delta = _views((dout * out.to(acc)).sum(-1), lay)  # m x (B, H, c)
        dq_full = torch.zeros_like(q, dtype=acc)  # (B, H, n, D)
        dq = _views(dq_full, lay)  # m x (B, H, c, D)
        kv = _chunks(k, lay) + _chunks(v, lay)  # 2m x (B, H_kv, c, D or Dv)
        like = [t.new_empty((1,) * t.dim()).expand(t.shape) for t in kv]  # shapes of the k/v chunks, no storage
        grads_like = [t.new_empty((1,) * t.dim(), dtype=acc).expand(t.shape) for t in kv]
        final = ret = None
        pending_acc = None
        for s in range(P):
            o, nxt = (r - s) % P, (r - s - 1) % P
            incoming = next_acc = None
            if s < plan.last[nxt]:
                incoming = p2p.recv(like, (r - 1) % P, _tag(s, 0), f"k/v of rank {nxt}", s)
                if s >= 1:  # the accumulator of shard nxt starts on the first rank after its owner
                    next_acc = p2p.recv(grads_like, (r - 1) % P, _tag(s, 1), f"dk/dv of rank {nxt}", s)
            if s == plan.last[r] > 0:  # our dk/dv come back from the last rank that needs our keys, at its step
                # s; posted in the order the sender sends (backends without tags, such as NCCL, match in order)
                ret = p2p.recv(grads_like, (r + s) % P, _tag(P, 0), "the dk/dv of our keys", s)
            if s < plan.last[o]:
                p2p.send(kv, (r + 1) % P, _tag(s, 0), f"k/v of rank {o}", s)
            p2p.start()
            if s <= plan.last[o]:  # we hold shard o (and, after step 0, its gradient accumulator)
                dkv = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in like]  # 2m x (B, H_kv, c, D|Dv)
                for qi, ql, ki, kl, pat in plan.tasks[r][o]:
                    dq_b, dk_b, dv_b = pair_backward(
                        _real(qc[qi], ql), _real(kv[ki], kl), _real(kv[m + ki], kl), _real(dc[qi], ql),
                        _real(lc[qi], ql), _real(delta[qi], ql), pat, scale)
                    _real(dq[qi], ql).add_(dq_b)
                    _real(dkv[ki], kl).add_(dk_b)
                    _real(dkv[m + ki], kl).add_(dv_b)
                if s >= 2:
                    p2p.wait(pending_acc[1])
                    for mine, theirs in zip(dkv, pending_acc[0]):
                        mine.add_(theirs)
                if s == 0:  # our own keys' gradient from our own queries stays here
                    final = (torch.cat(dkv[:m], 2), torch.cat(dkv[m:], 2))  # (B, H_kv, n, D), (B, H_kv, n, Dv)
                    del dkv
                elif s < plan.last[o]:
                    p2p.send(dkv, (r + 1) % P, _tag(s, 1), f"dk/dv of rank {o}", s)
                else:
                    p2p.send(dkv, o, _tag(P, 0), f"the final dk/dv of rank {o}", s)
                p2p.start()
            kv = None
            if incoming is not None:
                p2p.wait(incoming[1])
                kv = incoming[0]
            pending_acc = next_acc
            p2p.wait_sends()  # every receiver posted its receive before its own waits: no cycle
        dk, dv = final
        if ret is not None:
            p2p.wait(ret[1])
            for mine, theirs in zip(_views(dk, lay) + _views(dv, lay), ret[0]):
                mine.add_(theirs)
        return dq_full.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None = None, group=None, *,
                   seq_len: int | None = None, layout: str = "zigzag", scale: float | None = None) -> Tensor:
    """Context-parallel attention of this rank's sequence shard by passing key/value shards around the ring.

    Every rank of ``group`` calls it with its shards (from :func:`headwise.distributed.shard_sequence`);
    ``gather_sequence(ring_attention(shard(q), shard(k), shard(v), pattern))`` equals
    ``headwise.attention(q, k, v, pattern)``, forward and backward (module docstring for the algorithm).

    Args:
        q: ``[B, H, n, D]`` this rank's query shard (``n = local_len``, padding included).
        k: ``[B, H_kv, n, D]`` key shard (``H`` a multiple of ``H_kv``: MHA, GQA, MQA).
        v: ``[B, H_kv, n, Dv]`` value shard.
        pattern: a :class:`headwise.patterns.Pattern` on global positions; ``None`` is full attention.
        group: the process group (default: the world).
        seq_len: the real sequence length ``N``; default ``n x P`` (no padding). Required when ``N`` is not a
            multiple of ``2P`` (zigzag) or ``P`` (contiguous).
        layout: the layout the shards were made with, ``"zigzag"`` (default) or ``"contiguous"``.
        scale: score scale, default ``D ** -0.5``.

    Returns:
        ``[B, H, n, Dv]`` this rank's output shard (zeros on padded rows and on rows the pattern gives no key).

    Example (each of P processes, after ``torch.distributed.init_process_group``; not a doctest)::

        qs, ks, vs = (shard_sequence(t) for t in (q, k, v))
        out = ring_attention(qs, ks, vs, Causal(), seq_len=q.shape[2])   # [B, H, n, D]
    """
    check_qkv(q, k, v, None, scale)
    if not q.shape[2] == k.shape[2]:
        raise ValueError(f"ring_attention is self-attention: q and k shards must have one length, got "
                         f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    world, _ = world_and_rank(group)
    lay = layout_for(q.shape[2], world, layout, seq_len)
    check_global(q, k, v, pattern, lay.seq_len)
    plan = ring_plan(pattern, lay)
    return _RingAttention.apply(q, k, v, plan, group, default_scale(q, scale))
