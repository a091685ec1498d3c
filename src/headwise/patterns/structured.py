"""Structured sparse patterns from the papers: MaxViT block and grid attention, HaloNet's blocked local attention
with halo, Radial Attention for video, S2-Attention's heterogeneous context sharding among heads, and label-based
region attention (Region Attention Transformer) and isolation attention (IR-Diffusion).

Every pattern has an exact analytic tile schedule (tested against :meth:`Pattern.exhaustive_schedule`). The
grid patterns reuse :class:`~headwise.patterns.Neighborhood`'s per-dimension interval schedule and its token
permutation (tiles are boxes of the grid, dilation groups contiguous), so MaxViT's dilated grid groups become
block-diagonal; the label patterns permute tokens by label.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

from headwise.patterns.base import (
    Pattern,
    TileSchedule,
    check_tile,
    ceil_div,
    interval_tile_ranges,
    schedule_from_states,
)
from headwise.patterns.neighborhood import Neighborhood, per_dim
from headwise.patterns.segments import Segments, as_vector, brief

__all__ = ["MaxViTBlock", "MaxViTGrid", "Halo", "ConvWindow", "CyclicShift", "directional_shifts", "Radial", "S2Shards",
           "RegionAttention", "Isolation"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _grid(grid) -> tuple[int, ...]:
    """``(N,)``, ``(H, W)`` or ``(T, H, W)`` of positive ints (an int is a 1-D grid)."""
    dims = (grid,) if _is_int(grid) else grid
    if not isinstance(dims, (tuple, list)) or not 1 <= len(dims) <= 3:
        raise ValueError(f"grid must be (N,), (H, W) or (T, H, W), got grid={grid!r}")
    return per_dim("grid", tuple(dims), len(dims))


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={value!r}")
    return int(value)


# ---- MaxViT -------------------------------------------------------------------------------------------------
class MaxViTBlock(Neighborhood):
    """MaxViT block attention (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022): the grid is cut into
    non-overlapping windows of ``window`` tokens per dim (P x P in 2-D) and each token attends exactly the tokens of
    its window: ``q`` attends ``k`` iff ``q_i // P_i == k_i // P_i`` in every dim ``i``.

    ``grid``: ``(N,)``, ``(H, W)`` or ``(T, H, W)``, tokens flattened row-major; ``window``: an int or one per dim,
    and it must divide the grid (MaxViT pads the feature map to a multiple of P; pad before calling). The default
    P = 7 of the paper is not assumed: give it. This is :class:`Neighborhood` with ``kernel_size = stride = P``,
    whose schedule (token permutation into boxes, block-diagonal tiles) it inherits.
    """

    def __init__(self, grid, window):
        grid = _grid(grid)
        window = per_dim("window", window, len(grid))
        for i, (g, p) in enumerate(zip(grid, window)):
            if g % p:
                raise ValueError(f"window={window} must divide grid={grid} (dim {i}: {g} % {p} != 0); pad the grid")
        super().__init__(grid, window, stride=window)
        object.__setattr__(self, "window_size", window)

    def __repr__(self):
        return f"MaxViTBlock(grid={self.grid}, window={self.window_size})"


class MaxViTGrid(Neighborhood):
    """MaxViT grid attention (Tu et al., ECCV 2022): a ``G x G`` grid dilated over the whole image. The grid
    ``(H, W)`` is viewed as ``(G, H/G, G, W/G)`` and attention runs over the two ``G`` axes: ``q`` attends ``k``
    iff ``q_i % (L_i / G_i) == k_i % (L_i / G_i)`` in every dim, so each token attends the ``prod(G)`` tokens at
    the same offset in every cell, spread over the whole image (sparse, global mixing).

    ``grid_size``: ``G``, an int or one per dim, must divide the grid. This is :class:`Neighborhood` with
    ``kernel_size = stride = G`` and ``dilation = L / G``: its token permutation makes every dilated group
    contiguous, so the schedule is block-diagonal (dense tiles only when a group fills whole tiles).
    """

    def __init__(self, grid, grid_size):
        grid = _grid(grid)
        grid_size = per_dim("grid_size", grid_size, len(grid))
        for i, (g, s) in enumerate(zip(grid, grid_size)):
            if g % s:
                raise ValueError(f"grid_size={grid_size} must divide grid={grid} (dim {i}: {g} % {s} != 0); "
                                 "pad the grid")
        dilation = tuple(g // s for g, s in zip(grid, grid_size))
        super().__init__(grid, grid_size, stride=grid_size, dilation=dilation)
        object.__setattr__(self, "grid_size", grid_size)

    def __repr__(self):
        return f"MaxViTGrid(grid={self.grid}, grid_size={self.grid_size})"


def _keys_per_dim(p: Neighborhood, i: int) -> int:
    """Sum over the queries of one axis of the keys each attends along it, for any (overridden) window."""
    lengths = p._group_lengths(i)  # (d,) tokens per dilation group
    x = torch.arange(int(lengths.max()))[None, :]  # (1, L_g)
    lo, hi = p.window(i, x, lengths[:, None])  # (d, L_g)
    return int(torch.where(x < lengths[:, None], hi - lo + 1, 0).sum())


# ---- HaloNet ------------------------------------------------------------------------------------------------
class Halo(Neighborhood):
    """Blocked local self-attention with a halo (Vaswani et al., "Scaling Local Self-Attention for Parameter
    Efficient Visual Backbones", CVPR 2021, HaloNet).

    The grid is cut into query blocks of ``block`` tokens per dim (b x b in 2-D); every query of a block attends
    the block extended by ``halo`` tokens on each side ((b + 2h) x (b + 2h) keys). Per dim, with
    ``s = (x // b) * b`` the first coordinate of the query's block, query ``x`` attends keys
    ``max(s - h, 0) <= y <= min(s + b - 1 + h, L - 1)``.

    Border choice: the window is *cropped* at the image border (the same attention as zero-padding the image by
    ``h`` and masking the padded keys; attending unmasked zero pads would differ), unlike :class:`Neighborhood`,
    which shifts windows inward. A grid
    that ``block`` does not divide gets a smaller last block per dim (cropped the same way) instead of padding.
    ``block <= grid`` per dim. The schedule is :class:`Neighborhood`'s (boxes aligned to the blocks).
    """

    def __init__(self, grid, block, halo):
        grid = _grid(grid)
        block = per_dim("block", block, len(grid))
        halo = (halo,) * len(grid) if _is_int(halo) else halo
        if (not isinstance(halo, (tuple, list)) or len(halo) != len(grid)
                or not all(_is_int(h) and h >= 0 for h in halo)):
            raise ValueError(f"halo must be an int >= 0 or one per grid dim, got halo={halo!r}")
        for i, (g, b) in enumerate(zip(grid, block)):
            if b > g:
                raise ValueError(f"block={block} exceeds grid={grid} along dim {i}")
        kernel = tuple(min(b + 2 * h, g) for g, b, h in zip(grid, block, halo))  # only validates; see window()
        super().__init__(grid, kernel, stride=block)
        object.__setattr__(self, "block", block)
        object.__setattr__(self, "halo", tuple(int(h) for h in halo))

    def window(self, i, x, length):
        b, h = self.block[i], self.halo[i]
        start = (x // b) * b  # first coordinate of the query's block
        hi = start + b - 1 + h
        hi = torch.minimum(hi, length - 1) if isinstance(length, Tensor) else hi.clamp(max=length - 1)
        return torch.maximum(start - h, torch.zeros_like(hi)), hi  # both broadcast against length

    def _keys_per_dim(self, i):
        return _keys_per_dim(self, i)

    def __repr__(self):
        return f"Halo(grid={self.grid}, block={self.block}, halo={self.halo})"

    def __eq__(self, other):
        return type(other) is Halo and (self.grid, self.block, self.halo) == (other.grid, other.block, other.halo)

    def __hash__(self):
        return hash(("Halo", self.grid, self.block, self.halo))


# ---- TiC's MSA-Conv windows --------------------------------------------------------------------------------
class ConvWindow(Neighborhood):
    """The window of a (dilated) convolution as an attention pattern: self-attention inside convolution windows, the
    MSA-Conv of TiC (Zhang et al., "TiC: Exploring Vision Transformer in Convolution", 2023), stride 1 and
    "same" zero padding.

    Per dim, query ``x`` attends keys ``y = x + dilation * o`` for ``o`` in ``[-(k // 2), k // 2]`` that lie
    inside the grid: the convolution's receptive field, *cropped* at the border (zero padding with the padded keys
    masked), unlike :class:`Neighborhood`, whose windows shift inward and always hold ``k`` keys. ``kernel_size``
    must be odd (a centred window); it may exceed the grid. Standard (``dilation = 1``) and dilated windows are
    covered; the depthwise form shares this window across channel groups (heads), so it is the same pattern.
    The schedule is :class:`Neighborhood`'s (dilation groups made contiguous by token permutation).

    TiC's multi-directional cyclic shift is :class:`CyclicShift` around this pattern; its inter-pooling is in the
    ``msa_conv`` module (:class:`headwise.variants.msa_conv.MSAConv`).
    """

    def __init__(self, grid, kernel_size, dilation=1):
        grid = _grid(grid)
        kernel = per_dim("kernel_size", kernel_size, len(grid))
        dilation = per_dim("dilation", dilation, len(grid))
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel_size must be odd (a centred convolution window), got kernel_size={kernel_size!r}")
        for i, (g, d) in enumerate(zip(grid, dilation)):
            if d > g:
                raise ValueError(f"dilation={dilation} exceeds grid={grid} along dim {i}")
        clipped = tuple(min(k, g // d) for k, g, d in zip(kernel, grid, dilation))  # only validates; see window()
        super().__init__(grid, clipped, stride=1, dilation=dilation)
        object.__setattr__(self, "conv_kernel", kernel)

    def window(self, i, x, length):
        r = self.conv_kernel[i] // 2  # within the dilation group, the window is x - r .. x + r, cropped
        hi = torch.minimum(x + r, length - 1) if isinstance(length, Tensor) else (x + r).clamp(max=length - 1)
        return torch.maximum(x - r, torch.zeros_like(hi)), hi

    def _keys_per_dim(self, i):
        return _keys_per_dim(self, i)

    def __repr__(self):
        return f"ConvWindow(grid={self.grid}, kernel_size={self.conv_kernel}, dilation={self.dilation})"

    def __eq__(self, other):
        return (type(other) is ConvWindow
                and (self.grid, self.conv_kernel, self.dilation) == (other.grid, other.conv_kernel, other.dilation))

    def __hash__(self):
        return hash(("ConvWindow", self.grid, self.conv_kernel, self.dilation))


def directional_shifts(ndim: int, amount: int) -> tuple[tuple[int, ...], ...]:
    """The ``2 * ndim`` shift vectors ``+amount`` and ``-amount`` along each grid dim, in that order (for 2-D:
    down, up, right, left): the multi-directional shifts of :class:`CyclicShift`, one per head group."""
    _positive_int("ndim", ndim)
    _positive_int("amount", amount)
    return tuple(tuple(sign * amount * (d == i) for d in range(ndim)) for i in range(ndim) for sign in (1, -1))


@dataclass(frozen=True)
class CyclicShift(Pattern):
    """A grid pattern applied on a cyclically shifted feature map: the multi-directional cyclic shift of TiC
    (Zhang et al., "TiC: Exploring Vision Transformer in Convolution", 2023) around :class:`ConvWindow`.

    Head group ``g`` rolls the grid by the vector ``shifts[g]`` (``torch.roll`` semantics: the token at
    coordinate ``c`` moves to ``(c + shifts[g]) mod grid``), attends with ``pattern`` there, and rolls the result
    back. Attention is permutation-equivariant, so this is the pattern

        ``mask_h(q, k) = pattern.mask(roll_g(q), roll_g(k))``,  ``g = h // (heads / len(shifts))``

    on the original token order: tokens near one border see the tokens of the opposite border (the windows wrap
    around the image), and each head group's seam lies elsewhere, so the heads together connect distant tokens.
    ``shifts``: one shift vector (one int per grid dim) per head group, e.g. :func:`directional_shifts`; the
    ``heads`` split into ``len(shifts)`` equal contiguous groups. With one shift vector the pattern is shared by
    all heads (``heads`` is ignored); an all-zero shift is ``pattern`` itself.

    Choice (the TiC paper's exact shift amounts and directions were not available to us): the shifts are the
    caller's; rolling is per head group on q, k and v together, after the projections.

    Tile schedule: ``pattern``'s schedule with its token permutation composed with the roll (exact, as tile
    states depend only on which tokens share a tile). ``density`` is ``pattern``'s.
    """

    pattern: Pattern  # a grid pattern shared by all heads (e.g. ConvWindow)
    shifts: tuple  # one shift vector (an int per grid dim) per head group; normalized modulo the grid
    heads: int | None = None  # number of heads H (a multiple of the groups); None with a single shift vector

    def __post_init__(self):
        pattern, shifts, heads = self.pattern, self.shifts, self.heads
        if not isinstance(pattern, Pattern) or not hasattr(pattern, "grid"):
            raise ValueError(f"pattern must be a grid Pattern (with a .grid), got pattern={pattern!r}")
        if pattern.heads is not None:
            raise ValueError(f"pattern must be shared by all heads, got a head-specific pattern={pattern!r}")
        grid = tuple(pattern.grid)
        vectors = (shifts,) if _is_int(shifts) or (isinstance(shifts, (tuple, list)) and shifts
                                                     and all(_is_int(v) for v in shifts)) else shifts
        if (not isinstance(vectors, (tuple, list)) or not vectors
                or not all(isinstance(v, (tuple, list, numbers.Integral)) for v in vectors)):
            raise ValueError(f"shifts must be one shift vector or a sequence of them, got shifts={shifts!r}")
        norm = []
        for v in vectors:
            v = (v,) * len(grid) if _is_int(v) and len(grid) == 1 else v
            if _is_int(v) or len(v) != len(grid) or not all(_is_int(x) for x in v):
                raise ValueError(f"each shift needs one int per grid dim ({len(grid)} for grid={grid}), "
                                 f"got shifts={shifts!r}")
            norm.append(tuple(int(x) % g for x, g in zip(v, grid)))
        if len(norm) > 1:
            if not _is_int(heads) or heads < 1 or heads % len(norm):
                raise ValueError(f"heads must be a positive multiple of the {len(norm)} shift groups, got {heads=}")
        else:
            heads = None
        object.__setattr__(self, "shifts", tuple(norm))
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "_table", torch.tensor(self.shifts, dtype=torch.long))  # (G, ndim)

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    def roll(self, idx: Tensor, head=None) -> Tensor:
        """Flat token ids after the roll of ``head``'s group (broadcasting; ``head`` may be a tensor)."""
        if self.heads is None:
            shift = self.shifts[0]
        else:
            if head is None:
                raise ValueError("CyclicShift with several shift groups is head-specific: pass head=")
            if isinstance(head, int) and not 0 <= head < self.heads:
                raise ValueError(f"{head=} out of range for CyclicShift with heads={self.heads}")
            group = head // (self.heads // len(self.shifts))
            table = self._table.to(idx.device)
            shift = [table[group, d] if isinstance(group, Tensor) else self.shifts[group][d]
                     for d in range(len(self.grid))]
        out, place, rest = torch.zeros_like(idx), 1, idx
        for d in reversed(range(len(self.grid))):  # row-major: the last dim varies fastest
            g = self.grid[d]
            out = out + ((rest % g + shift[d]) % g) * place
            rest, place = rest // g, place * g
        return out

    def mask(self, q_idx, kv_idx, head=None):
        return self.pattern.mask(self.roll(q_idx, head), self.roll(kv_idx, head))

    def check(self, n_q, n_kv):
        self.pattern.check(n_q, n_kv)

    def density(self, n_q, n_kv):
        return self.pattern.density(n_q, n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        s = self.pattern.tile_schedule(n_q, n_kv, tile_q, tile_kv)
        ids = torch.arange(n_q)
        forward = self.roll(ids, head)  # original token -> its position on the rolled grid
        if torch.equal(forward, ids):
            return s
        unroll = torch.argsort(forward)  # rolled position -> original token
        q_perm = unroll if s.q_perm is None else unroll[s.q_perm]
        kv_perm = unroll if s.kv_perm is None else unroll[s.kv_perm]
        return TileSchedule(s.n_q, s.n_kv, s.q_bounds, s.kv_bounds, s.kv_tiles, s.full, q_perm, kv_perm)


# ---- Radial attention ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Radial(Pattern):
    """Radial attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long
    Video Generation", 2025): spatial windows that shrink exponentially with temporal distance.

    Tokens are ``frames x tokens_per_frame`` (``S``), frame-major: token ``t`` is position ``x = t % S`` of frame
    ``f = t // S``. For a query ``(f, x)`` and key ``(f', x')`` with temporal distance ``d = |f - f'|``, band
    ``r = floor(log2(max(d, 1)))`` and half-width ``w = floor(window / 2**r)``:

    * ``w >= 1``: attend iff ``|x - x'| <= w`` (a band around the spatial diagonal of the frame pair);
    * ``w == 0`` (far frames): attend iff ``x == x'`` and ``d % (2**r // window) == 0`` (only every
      ``2**r / window``-th frame of the band keeps its diagonal, so each band costs about the same).

    With the default ``window = S`` the frames at distance 0 and 1 attend densely, distances 2-3 at half width,
    4-7 at quarter width, ...: each query attends about ``S`` keys per band and ``log2(frames)`` bands, so the
    density falls like ``log n / n`` as frames grow (the paper's O(n log n)).

    Choices (the paper defines the mask on 128-token blocks of flattened frames, its code also keeps the first
    frame dense as an attention sink; here the mask is token-exact, spatial distance is the flattened in-frame
    index distance as in the reference code, and there is no sink). Bidirectional (video diffusion).

    Tile schedule: tiles never straddle a frame (per frame, tiles of ``tile_q`` / ``tile_kv`` tokens, the last one
    smaller); per (query tile, key frame) the visited key tiles are an interval, in closed form. No permutation.
    """

    frames: int  # number of frames F
    tokens_per_frame: int  # tokens per frame S (flattened spatial positions)
    window: int | None = None  # half-width of the spatial window at temporal distance 0 and 1; None: S

    def __post_init__(self):
        _positive_int("frames", self.frames)
        _positive_int("tokens_per_frame", self.tokens_per_frame)
        if self.window is None:
            object.__setattr__(self, "window", int(self.tokens_per_frame))
        _positive_int("window", self.window)

    @property
    def n(self) -> int:
        return self.frames * self.tokens_per_frame

    def decay(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """Half-width ``w`` and frame step of temporal distances ``d`` (integer ops only, FlexAttention-safe)."""
        w = torch.full_like(d, self.window)
        step = torch.ones_like(d)
        for p in range(1, max(self.frames, 2).bit_length()):  # band r = p where d >= 2**p
            far = d >= (1 << p)
            w = torch.where(far, self.window >> p, w)
            step = torch.where(far, max(1, (1 << p) // self.window), step)
        return w, step

    def mask(self, q_idx, kv_idx, head=None):
        S = self.tokens_per_frame
        d = (q_idx // S - kv_idx // S).abs()
        dx = (q_idx % S - kv_idx % S).abs()
        w, step = self.decay(d)
        return torch.where(w >= 1, dx <= w, (dx == 0) & (d % step == 0))

    def check(self, n_q, n_kv):
        super().check(n_q, n_kv)
        if n_q != self.n or n_kv != self.n:
            raise ValueError(f"frames * tokens_per_frame = {self.frames} * {self.tokens_per_frame} = {self.n} "
                             f"does not match the sequence lengths {n_q=} {n_kv=}")

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        F, S = self.frames, self.tokens_per_frame
        d = torch.arange(F)
        w, step = self.decay(d)  # (F,)
        x = torch.arange(S)
        band = (torch.minimum(x[None] + w[:, None], torch.tensor(S - 1)) - (x[None] - w[:, None]).clamp(min=0) + 1)
        keys = torch.where(w >= 1, band.sum(1), torch.where(d % step == 0, S, 0))  # (F,) pairs per frame pair
        frame_pairs = torch.where(d == 0, F, 2 * (F - d))  # (F,) ordered frame pairs at distance d
        return int((keys * frame_pairs).sum()) / (n_q * n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        F, S = self.frames, self.tokens_per_frame

        def bounds(tile):
            starts = torch.arange(0, S, tile)  # in-frame tile starts
            return torch.cat([(torch.arange(F)[:, None] * S + starts[None]).reshape(-1), torch.tensor([F * S])])

        q_bounds, kv_bounds = bounds(tile_q), bounds(tile_kv)
        frame = q_bounds[:-1] // S  # (T,) query tile's frame
        x0 = q_bounds[:-1] % S  # (T,) first and last in-frame position of the query tile
        x1 = (q_bounds[1:] - 1) % S
        d = (frame[:, None] - torch.arange(F)[None]).abs()  # (T, F) distance to each key frame
        w, step = self.decay(d)
        x0, x1 = x0[:, None], x1[:, None]
        banded = w >= 1
        keep = d % step == 0
        union_lo = torch.where(banded, x0 - w, torch.where(keep, x0, S))  # S: no key in this frame
        union_hi = torch.where(banded, x1 + w, x1)
        common_lo = torch.where(banded, x1 - w, x1)
        common_hi = torch.where(banded, x0 + w, x0)
        lo, hi, full_lo, full_hi = interval_tile_ranges(S, tile_kv, union_lo, union_hi, common_lo, common_hi)
        u = torch.arange(ceil_div(S, tile_kv))  # in-frame key tiles
        vis = (u >= lo[..., None]) & (u <= hi[..., None])  # (T, F, U)
        full = vis & (u >= full_lo[..., None]) & (u <= full_hi[..., None])
        states = torch.where(full, 2, torch.where(vis, 1, 0)).to(torch.int8).reshape(len(frame), -1)
        return schedule_from_states(n_q, n_kv, q_bounds, kv_bounds, states)


# ---- S2-Attention -------------------------------------------------------------------------------------------
_VERTICAL = ("auto", "absolute", "relative")


@dataclass(frozen=True)
class S2Shards(Pattern):
    """Heterogeneous context sharding among heads (Lin et al., "S2-Attention: Hardware-Aware Context Sharding
    Among Attention Heads", 2024), a head-specific pattern (``heads = H``).

    Tokens are cut into blocks of ``block``; with query block ``i = q // block``, key block ``j = k // block``,
    head ``h``, ``s = vertical_stride``, ``step = max(1, s // heads)`` (DKernel's ``head_sliding_step``) and
    ``o_h = h * step`` (``0`` for every head when ``homo_head``), head ``h`` attends block ``j`` iff

    * local: ``0 <= i - j < local_blocks`` (causal) or ``|i - j| < local_blocks`` (non-causal), or
    * vertical, ``"absolute"`` form: ``(j + o_h + 1) % s == 0``: every ``s``-th key block counted from the start
      of the sequence, at a head-dependent offset (the same key blocks for every query: KV-cache friendly), or
    * vertical, ``"relative"`` form: ``(e + o_h) % s == 0`` with ``e`` the distance of ``j`` past the local
      window, ``e = max(0, i - j - L + 1) + max(0, j - i - R + 1)`` (``L = local_blocks``; ``R = local_blocks``
      non-causal, ``R = 1`` causal): every ``s``-th key block counted outward from the query's local window,
      on both sides (so the pattern is shift-invariant along the sequence), or
    * ``h`` is one of the last ``dense_heads`` heads (dense, the paper's hybrid dense/sparse heads),

    and, when ``causal``, element-wise ``k <= q``. ``vertical="auto"`` (default) is DKernel's default: absolute
    when causal (to save KV cache), relative when not (``vert_position_type`` in DKernel's
    ``get_sparse_attn_mask``). With ``heads >= vertical_stride`` and ``homo_head=False`` the heads' vertical
    blocks together cover every key block in both forms, so the union over heads is the full (causal) context.

    Choices: the absolute offset ``+ 1`` is the Phi-3-small / vLLM form (DKernel's ``head_sliding_offset=1``).
    DKernel's relative form uses no head offset (every sparse head alike, ``homo_head=True`` here); the default
    ``homo_head=False`` offsets the relative stride by ``o_h`` per head as in the absolute form, so that the heads
    shard the context (the paper's principle) in the non-causal form too; head 0 is DKernel's pattern exactly.
    ``n_q == n_kv`` (self-attention, top-left aligned).

    Tile schedule (per head): tiles never straddle a block (each block split into equal chunks of at most
    ``tile_q`` / ``tile_kv`` tokens); a tile pair's state follows from its blocks and, causally, its positions.
    """

    heads: int = field()  # number of heads H (a field without default: Pattern.heads defaults to None)
    local_blocks: int  # local key blocks per query block (its own included)
    vertical_stride: int  # every vertical_stride-th key block is attended, at a head-dependent offset
    block: int = 64  # tokens per block
    causal: bool = True  # keep only keys k <= q
    dense_heads: int = 0  # the last dense_heads heads attend densely
    vertical: str = "auto"  # "absolute", "relative", or "auto": absolute when causal, relative otherwise
    homo_head: bool = False  # True: every sparse head uses head 0's vertical blocks (no per-head offset)

    def __post_init__(self):
        _positive_int("heads", self.heads)
        _positive_int("local_blocks", self.local_blocks)
        _positive_int("vertical_stride", self.vertical_stride)
        _positive_int("block", self.block)
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got causal={self.causal!r}")
        if not _is_int(self.dense_heads) or not 0 <= self.dense_heads <= self.heads:
            raise ValueError(f"dense_heads must be an int in [0, heads={self.heads}], "
                             f"got dense_heads={self.dense_heads!r}")
        if self.vertical not in _VERTICAL:
            raise ValueError(f"vertical must be one of {_VERTICAL}, got vertical={self.vertical!r}")
        if self.vertical == "auto":
            object.__setattr__(self, "vertical", "absolute" if self.causal else "relative")
        if not isinstance(self.homo_head, bool):
            raise ValueError(f"homo_head must be a bool, got homo_head={self.homo_head!r}")

    @property
    def step(self) -> int:
        """Vertical offset between consecutive heads (DKernel's ``head_sliding_step``)."""
        return max(1, self.vertical_stride // self.heads)

    def _head(self, head):
        if head is None:
            raise ValueError("S2Shards is head-specific: pass head= (an int or a tensor of head indices)")
        if isinstance(head, int) and not 0 <= head < self.heads:
            raise ValueError(f"{head=} out of range for S2Shards with heads={self.heads}")
        return head

    def block_mask(self, qb, kb, head):
        """Which key blocks ``kb`` query blocks ``qb`` attend at ``head`` (broadcasting)."""
        head = self._head(head)
        rel = qb - kb
        left, right = self.local_blocks, 1 if self.causal else self.local_blocks
        local = (rel < left) & (-rel < right)
        offset = 0 if self.homo_head else head * self.step
        if self.vertical == "absolute":
            vertical = (kb + offset + 1) % self.vertical_stride == 0
        else:
            excess = (rel - left + 1).clamp(min=0) + (-rel - right + 1).clamp(min=0)  # blocks past the window
            vertical = (excess + offset) % self.vertical_stride == 0
        dense = head >= self.heads - self.dense_heads
        if self.causal:
            vertical = vertical & (kb <= qb)
            dense = dense & (kb <= qb)
        return local | vertical | dense

    def mask(self, q_idx, kv_idx, head=None):
        m = self.block_mask(q_idx // self.block, kv_idx // self.block, head)
        return m & (kv_idx <= q_idx) if self.causal else m

    def check(self, n_q, n_kv):
        super().check(n_q, n_kv)
        if n_q != n_kv:
            raise ValueError(f"S2Shards is self-attention: needs n_q == n_kv, got {n_q=} {n_kv=}")

    def _bounds(self, n: int, tile: int) -> Tensor:
        chunk = ceil_div(self.block, ceil_div(self.block, tile))  # equal chunks of at most `tile` per block
        starts = (torch.arange(0, n, self.block)[:, None] + torch.arange(0, self.block, chunk)[None]).reshape(-1)
        return torch.cat([starts[starts < n], torch.tensor([n])])

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        sizes = self._bounds(n_q, self.block).diff()  # (nb,) block sizes
        nb = len(sizes)
        qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None]
        if self.causal:
            pairs = torch.where(kb < qb, sizes[:, None] * sizes[None], 0)
            pairs = pairs + torch.diag(sizes * (sizes + 1) // 2)
        else:
            pairs = sizes[:, None] * sizes[None]
        total = sum(int((pairs * self.block_mask(qb, kb, h)).sum()) for h in range(self.heads))
        return total / (n_q * n_kv * self.heads)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        head = self._head(head)
        q_bounds, kv_bounds = self._bounds(n_q, tile_q), self._bounds(n_kv, tile_kv)
        q_first, q_last = q_bounds[:-1, None], q_bounds[1:, None] - 1  # (Tq, 1)
        k_first, k_last = kv_bounds[None, :-1], kv_bounds[None, 1:] - 1  # (1, Tk)
        blocks = self.block_mask(q_first // self.block, k_first // self.block, head)  # (Tq, Tk)
        if self.causal:
            any_, all_ = blocks & (k_first <= q_last), blocks & (k_last <= q_first)
        else:
            any_ = all_ = blocks
        states = torch.where(all_, 2, torch.where(any_, 1, 0)).to(torch.int8)
        return schedule_from_states(n_q, n_kv, q_bounds, kv_bounds, states)


# ---- region and isolation attention -------------------------------------------------------------------------
def _flat_labels(name: str, labels) -> Tensor:
    """A label map of any shape (e.g. ``(H, W)``), flattened row-major to one label per token."""
    t = torch.as_tensor(labels)
    return as_vector(name, t.reshape(-1) if t.dim() > 1 else t, "int")


class RegionAttention(Segments):
    """Region-restricted multi-head self-attention (Region Attention Transformer, Yang et al., 2024): tokens attend
    only to tokens of their own region. ``labels``: a label map (``(N,)``, ``(H, W)``, ...; flattened row-major),
    one region id per token (e.g. from SAM masks). :class:`Segments` with its schedule (tokens sorted by region)."""

    def __init__(self, labels):
        super().__init__(_flat_labels("labels", labels))

    def __repr__(self):
        return f"RegionAttention({brief(self.labels)})"


class Isolation(Pattern):
    """Isolation attention (IR-Diffusion, "Tuning-Free Inversion-Enhanced Control for Consistent Image Editing";
    its multi-subject isolation): subjects do not attend to each other, and every token attends the shared
    background. Query ``i`` attends key ``j`` iff ``labels[j] == labels[i]`` or ``labels[j] == background_label``.

    Consequence (a choice): background queries attend only the background, so the background is computed as if
    alone and each subject sees it unchanged. ``subject_labels``: one label per token (any shape, flattened
    row-major), ``background_label`` marks the shared background.

    Tile schedule: tokens sorted by label with the background first (stable); tile states from per-tile label
    counts (``O(tiles^2 x labels)``).
    """

    def __init__(self, subject_labels, background_label: int = 0):
        self.labels = _flat_labels("subject_labels", subject_labels)
        if not _is_int(background_label):
            raise ValueError(f"background_label must be an int, got background_label={background_label!r}")
        self.background_label = int(background_label)
        self._device_copies: dict = {}

    def mask(self, q_idx, kv_idx, head=None):
        if q_idx.device not in self._device_copies:
            self._device_copies[q_idx.device] = self.labels.to(q_idx.device)
        labels = self._device_copies[q_idx.device]
        lk = labels[kv_idx]
        return (labels[q_idx] == lk) | (lk == self.background_label)

    def check(self, n_q, n_kv):
        super().check(n_q, n_kv)
        if n_q != len(self.labels) or n_kv != len(self.labels):
            raise ValueError(f"Isolation has {len(self.labels)} labels, got sequence lengths {n_q=} {n_kv=}")

    def _counts(self, labels: Tensor) -> tuple[Tensor, int]:
        """One-hot label ids ``(N, U)`` and the background's id (``U`` when absent)."""
        values, ids = torch.unique(labels, return_inverse=True)
        hit = (values == self.background_label).nonzero()
        bg = int(hit[0, 0]) if len(hit) else len(values)
        return torch.nn.functional.one_hot(ids, len(values) + 1).double(), bg

    def density(self, n_q, n_kv):
        self.check(n_q, n_kv)
        onehot, bg = self._counts(self.labels)
        c = onehot.sum(0)  # (U + 1,) tokens per label
        return float((c * c).sum() + (n_q - c[bg]) * c[bg]) / (n_q * n_kv)

    def tile_schedule(self, n_q, n_kv, tile_q=64, tile_kv=64, head=None) -> TileSchedule:
        self.check(n_q, n_kv)
        check_tile(tile_q, tile_kv)
        key = torch.where(self.labels == self.background_label, self.labels.min() - 1, self.labels)
        perm = torch.sort(key, stable=True).indices
        perm = None if torch.equal(perm, torch.arange(n_q)) else perm
        labels = self.labels if perm is None else self.labels[perm]  # (N,) in schedule order
        onehot, bg = self._counts(labels)  # (N, U + 1)
        q_bounds = torch.tensor(list(range(0, n_q, tile_q)) + [n_q])
        kv_bounds = torch.tensor(list(range(0, n_kv, tile_kv)) + [n_kv])

        def per_tile(bounds):  # (T, U + 1) label counts per tile
            cum = torch.cat([torch.zeros(1, onehot.shape[1], dtype=onehot.dtype), onehot.cumsum(0)])
            return cum[bounds[1:]] - cum[bounds[:-1]]

        cq, ck = per_tile(q_bounds), per_tile(kv_bounds)
        q_sizes, kv_sizes = q_bounds.diff().double(), kv_bounds.diff().double()
        pairs = cq @ ck.T + (q_sizes - cq[:, bg])[:, None] * ck[None, :, bg]  # (Tq, Tk) attended pairs
        full = pairs == q_sizes[:, None] * kv_sizes[None]
        states = torch.where(full, 2, torch.where(pairs > 0, 1, 0)).to(torch.int8)
        return schedule_from_states(n_q, n_kv, q_bounds, kv_bounds, states, perm, perm)

    def __repr__(self):
        return f"Isolation({brief(self.labels)}, background_label={self.background_label})"

    def __eq__(self, other):
        return (isinstance(other, Isolation) and self.background_label == other.background_label
                and torch.equal(self.labels, other.labels))

    def __hash__(self):
        return hash(("Isolation", tuple(self.labels.tolist()), self.background_label))
