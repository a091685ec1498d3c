"""The block-sparse engine: run any pattern from its tile schedule, visiting only the key tiles it touches.

For each query tile the engine visits the key tiles of the pattern's :class:`~headwise.patterns.TileSchedule`,
applies the element mask only on partial tiles, and merges tiles with the online softmax (log-sum-exp), so
no ``N x N`` tensor exists: memory is O(N x visited keys) at most, O(N D) for the fused CPU kernel.
Patterns that reorder tokens (N-D neighborhoods, segments) give a permutation; q, k, v are gathered into
that order once, attention runs on compact tiles, and the output is scattered back.

Two executors share one plan:

* ``blocksparse_cpu``: a fused C++ kernel (``kernels/blocksparse.cpp``, compiled on first use with
  ``torch.utils.cpp_extension``): per (batch, head, query tile), MKL GEMMs over runs of contiguous key tiles,
  a vectorized online softmax, and a recomputing backward (FlashAttention-style, with ``delta = rowsum(dO * O)``).
  float32 and float64; other dtypes are computed in float32.
* ``blocksparse_torch``: the same schedule in plain PyTorch (gather the visited keys per query tile, batched
  matmul, masked softmax), differentiable by autograd. Used on GPUs, when the extension cannot be built,
  or with ``HEADWISE_NO_EXTENSION=1``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from headwise.core.checks import default_scale, lse_dtype
from headwise.patterns.base import Full, Pattern, TileSchedule, tile_masks

log = logging.getLogger("headwise.core.blocksparse")

__all__ = ["blocksparse_attention", "BlockPlan", "make_plan", "computed_fraction", "can_run", "extension"]

TILE_Q = 64  # default query tile (tokens); N-D patterns shape it into a box
TILE_KV = 64  # default key tile


# ---- plans ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BlockPlan:
    """A tile schedule prepared for execution (everything independent of batch, heads and values).

    ``part_idx[t, j]`` indexes ``part_mask`` for the partial tile ``kv_tiles[t, j]`` (-1 for full tiles and
    padding); ``part_mask[p]`` is the element mask ``[tile_q_max, tile_kv_max]`` of partial tile ``p``, in the
    permuted order.
    """

    schedule: TileSchedule
    part_idx: Tensor  # (n_q_tiles, max_visit) int64
    part_mask: Tensor  # (n_partial, tq_max, tk_max) bool
    q_inv: Tensor | None  # inverse of schedule.q_perm

    @functools.cached_property
    def computed_fraction(self) -> float:
        return self.schedule.computed_pairs() / (self.schedule.n_q * self.schedule.n_kv)

    def to(self, device) -> BlockPlan:
        s = self.schedule
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        sched = TileSchedule(s.n_q, s.n_kv, mv(s.q_bounds), mv(s.kv_bounds), mv(s.kv_tiles), mv(s.full),
                             mv(s.q_perm), mv(s.kv_perm))
        return BlockPlan(sched, mv(self.part_idx), mv(self.part_mask), mv(self.q_inv))


def build_plan(pattern: Pattern, n_q: int, n_kv: int, tile_q: int = TILE_Q, tile_kv: int = TILE_KV,
               head: int | None = None) -> BlockPlan:
    """Schedule ``pattern`` and evaluate the element masks of its partial tiles."""
    s = pattern.tile_schedule(n_q, n_kv, tile_q, tile_kv, head=head)
    partial = s.visited & ~s.full  # (n_qt, V)
    part_idx = torch.full(s.kv_tiles.shape, -1, dtype=torch.long)
    qt_of, slot = partial.nonzero(as_tuple=True)
    part_idx[qt_of, slot] = torch.arange(qt_of.numel())
    part_mask = tile_masks(pattern, s, qt_of, s.kv_tiles[qt_of, slot], head)  # (P, tq, tk)
    q_inv = None if s.q_perm is None else torch.argsort(s.q_perm)
    return BlockPlan(s, part_idx.contiguous(), part_mask.contiguous(), q_inv)


_PLANS: OrderedDict = OrderedDict()
_PLANS_LOCK = threading.Lock()
_PLAN_CACHE_SIZE = 64


def pattern_key(pattern: Pattern):
    try:
        hash(pattern)
        return ("value", pattern)
    except TypeError:
        return ("id", id(pattern))


def make_plan(pattern: Pattern | None, n_q: int, n_kv: int, tile_q: int = TILE_Q, tile_kv: int = TILE_KV,
              head: int | None = None, device: torch.device | str = "cpu") -> BlockPlan:
    """Cached :func:`build_plan` (keyed by the pattern's value when hashable, else its identity)."""
    pattern = Full() if pattern is None else pattern
    key = (pattern_key(pattern), n_q, n_kv, tile_q, tile_kv, head, str(device))
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
            return plan
    plan = build_plan(pattern, n_q, n_kv, tile_q, tile_kv, head)
    if str(device) != "cpu":
        plan = plan.to(device)
    with _PLANS_LOCK:
        _PLANS[key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def computed_fraction(pattern: Pattern | None, n_q: int, n_kv: int) -> float:
    """Fraction of the ``n_q x n_kv`` pairs the engine computes for this pattern (>= its density)."""
    heads = [None] if pattern is None or pattern.heads is None else range(pattern.heads)
    return sum(make_plan(pattern, n_q, n_kv, head=h).computed_fraction for h in heads) / len(heads)


# ---- the compiled CPU kernel ---------------------------------------------------------------------------
_EXT = None
_EXT_ERROR: str | None = None
_EXT_LOCK = threading.Lock()
_SOURCE = Path(__file__).parent / "kernels" / "blocksparse.cpp"
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-std=c++17", "-fopenmp"]


def extension():
    """The compiled kernel module, building it on first use; ``None`` if it cannot be built here."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    if os.environ.get("HEADWISE_NO_EXTENSION"):
        _EXT_ERROR = "disabled by HEADWISE_NO_EXTENSION"
        return None
    with _EXT_LOCK:
        if _EXT is None and _EXT_ERROR is None:
            try:
                from torch.utils import cpp_extension

                _put_ninja_on_path()
                src = _SOURCE.read_text()
                tag = hashlib.sha1((src + " ".join(_CFLAGS) + torch.__version__).encode()).hexdigest()[:12]
                build = Path(os.environ.get("HEADWISE_BUILD_DIR", Path.home() / ".cache" / "headwise")) / tag
                build.mkdir(parents=True, exist_ok=True)
                log.info("building the block-sparse CPU kernel in %s (once)", build)
                _EXT = cpp_extension.load(
                    name=f"headwise_blocksparse_{tag}", sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                    extra_ldflags=["-lm", "-fopenmp"], build_directory=str(build), verbose=False,
                )
            except Exception as e:  # no compiler, no ninja, ...: the PyTorch executor still runs
                _EXT_ERROR = f"{type(e).__name__}: {e}"
                log.warning("block-sparse CPU kernel unavailable, using the PyTorch executor: %s", _EXT_ERROR)
    return _EXT


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary is not there outside an activated venv."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


class _BlockSparseCPU(torch.autograd.Function):
    """Fused kernel on permuted, contiguous q/k/v; returns (out, lse) in the permuted order."""

    @staticmethod
    def forward(ctx, q, k, v, plan: BlockPlan, scale: float):
        s = plan.schedule
        out, lse = extension().forward(q, k, v, s.q_bounds, s.kv_bounds, s.kv_tiles, plan.part_idx,
                                       plan.part_mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.mark_non_differentiable()
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        s = ctx.plan.schedule
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = (dout * out).sum(-1)  # (B, H, N)
        if dlse is not None:  # d lse_i / d s_ij = p_ij: folds into delta
            delta = delta - dlse
        lse_safe = lse.masked_fill(torch.isinf(lse), -1e30).contiguous()
        dq, dk, dv = extension().backward(q, k, v, dout, lse_safe, delta.contiguous(), s.q_bounds, s.kv_bounds,
                                          s.kv_tiles, ctx.plan.part_idx, ctx.plan.part_mask, ctx.scale)
        return dq, dk, dv, None, None


def blocksparse_cpu(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float) -> tuple[Tensor, Tensor]:
    """Fused CPU kernel on permuted tensors (float32/float64)."""
    return _BlockSparseCPU.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, scale)


# ---- the PyTorch executor ------------------------------------------------------------------------------
def _gather_layout(plan: BlockPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Per query tile: padded query positions ``(n_qt, tq)``, visited key positions ``(n_qt, K)`` and the
    element mask ``(n_qt, tq, K)`` (O(N x visited keys) memory)."""
    s = plan.schedule
    q_sizes, kv_sizes = s.q_bounds.diff(), s.kv_bounds.diff()
    tq, tk = plan.part_mask.shape[1:] if plan.part_mask.numel() else (int(q_sizes.max()), int(kv_sizes.max()))
    n_qt, V = s.kv_tiles.shape
    dev = s.kv_tiles.device
    r, c = torch.arange(tq, device=dev), torch.arange(tk, device=dev)
    q_pos = (s.q_bounds[:-1, None] + r).clamp(max=s.n_q - 1)  # (n_qt, tq)
    q_ok = r[None] < q_sizes[:, None]
    kt = s.kv_tiles.clamp(min=0)
    kv_pos = (s.kv_bounds[kt][..., None] + c).clamp(max=s.n_kv - 1)  # (n_qt, V, tk)
    kv_ok = (c < kv_sizes[kt][..., None]) & s.visited[..., None]  # (n_qt, V, tk)
    mask = q_ok[:, :, None, None] & kv_ok[:, None]  # (n_qt, tq, V, tk)
    part = plan.part_idx >= 0
    if part.any():
        qt, j = part.nonzero(as_tuple=True)
        mask[qt, :, j, :] &= plan.part_mask[plan.part_idx[qt, j], :tq, :tk]
    return q_pos, kv_pos.reshape(n_qt, V * tk), mask.reshape(n_qt, tq, V * tk)


def blocksparse_torch(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, scale: float,
                      max_elems: int = 1 << 25) -> tuple[Tensor, Tensor]:
    """The schedule in plain PyTorch, on permuted tensors; differentiable by autograd."""
    B, H, N, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    g = H // Hkv
    acc = lse_dtype(q.dtype)
    q_pos, kv_pos, mask = _gather_layout(plan)
    n_qt, tq = q_pos.shape
    K = kv_pos.shape[1]
    out = q.new_zeros(B, H, N, Dv, dtype=acc)
    lse = q.new_full((B, H, N), float("-inf"), dtype=acc)
    step = max(1, max_elems // max(B * H * tq * K, 1))
    qg_all = q.to(acc).view(B, Hkv, g, N, -1)
    for t0 in range(0, n_qt, step):
        sl = slice(t0, t0 + step)
        qi, ki, m = q_pos[sl], kv_pos[sl], mask[sl]  # (c, tq), (c, K), (c, tq, K)
        qg = qg_all[:, :, :, qi]  # (B, Hkv, g, c, tq, D)
        kg = k.to(acc)[:, :, ki][:, :, None]  # (B, Hkv, 1, c, K, D)
        vg = v.to(acc)[:, :, ki][:, :, None]  # (B, Hkv, 1, c, K, Dv)
        s = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, Hkv, g, c, tq, K)
        s = s.masked_fill(~m, float("-inf"))
        l = torch.logsumexp(s, -1)  # (B, Hkv, g, c, tq)
        p = torch.exp(s - l.masked_fill(l == float("-inf"), 0)[..., None])
        o = torch.matmul(p, vg)  # (B, Hkv, g, c, tq, Dv)
        real = torch.arange(tq, device=q.device)[None] < plan.schedule.q_bounds.diff()[sl][:, None]  # (c, tq)
        idx = qi[real]  # positions written by this chunk
        out = out.index_copy(2, idx, o.reshape(B, H, -1, tq, Dv)[:, :, real])
        lse = lse.index_copy(2, idx, l.reshape(B, H, -1, tq)[:, :, real])
    return out.to(q.dtype), lse


# ---- entry point ---------------------------------------------------------------------------------------
def can_run(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, return_lse: bool) -> bool:
    """The engine runs every pattern on every device (fused kernel on CPU, PyTorch executor elsewhere)."""
    return True


def use_kernel(q: Tensor) -> bool:
    return q.device.type == "cpu" and extension() is not None


def blocksparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern | None, scale: float | None,
                          return_lse: bool, tile_q: int = TILE_Q, tile_kv: int = TILE_KV):
    """Attention restricted to ``pattern`` on the block-sparse engine; returns ``(out, lse)``."""
    scale = default_scale(q, scale)
    B, H, N, _ = q.shape
    M = k.shape[2]
    if pattern is not None and pattern.heads is not None:  # head-specific: one schedule per head
        g = H // k.shape[1]
        outs, lses = [], []
        for h in range(H):
            o, l = _run_one(q[:, h:h + 1], k[:, h // g:h // g + 1], v[:, h // g:h // g + 1], pattern, scale,
                            tile_q, tile_kv, head=h)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 1), torch.cat(lses, 1)
    return _run_one(q, k, v, pattern, scale, tile_q, tile_kv, head=None)


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[:, :, index]`` for ``x`` ``[B, H, N, F]`` (or ``[B, H, N]``) and ``index`` ``[N']`` (shared) or
    ``[B * H, N']`` (per head): one flat ``index_select`` over rows, about twice as fast as indexing dim 2."""
    B, H, N = x.shape[:3]
    F = x.shape[3] if x.dim() == 4 else 1
    flat = torch.arange(B * H, device=x.device)[:, None] * N + index  # (B * H, N')
    rows = x.reshape(B * H * N, F).index_select(0, flat.reshape(-1))
    return rows.view(*x.shape[:2], index.shape[-1], *x.shape[3:])


def _run_one(q, k, v, pattern, scale, tile_q, tile_kv, head):
    plan = make_plan(pattern, q.shape[2], k.shape[2], tile_q, tile_kv, head, q.device)
    s = plan.schedule
    qp = q if s.q_perm is None else take_rows(q, s.q_perm)  # (B, H, N, D) permuted
    kp = k if s.kv_perm is None else take_rows(k, s.kv_perm)
    vp = v if s.kv_perm is None else take_rows(v, s.kv_perm)
    if use_kernel(q):
        dtype = q.dtype
        if dtype not in (torch.float32, torch.float64):
            qp, kp, vp = qp.float(), kp.float(), vp.float()
        out, lse = blocksparse_cpu(qp, kp, vp, plan, scale)
        out = out.to(dtype)
    else:
        out, lse = blocksparse_torch(qp, kp, vp, plan, scale)
    if plan.q_inv is not None:
        out = take_rows(out, plan.q_inv)
        lse = take_rows(lse, plan.q_inv)
    return out, lse
