"""Structured patterns (MaxViT, HaloNet, TiC's conv windows and cyclic shift, Radial, S2-Attention, region /
isolation): exact schedules, the engine against the reference, the papers' structural claims, and errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headwise
from headwise.patterns import (
    ConvWindow,
    Halo,
    Isolation,
    MaxViTBlock,
    MaxViTGrid,
    Neighborhood,
    Radial,
    RegionAttention,
    S2Shards,
    Segments,
    from_spec,
)
from headwise.patterns.structured import CyclicShift, directional_shifts

from .conftest import check_schedule_exact

HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
TILES = st.sampled_from([(1, 1), (3, 5), (7, 4), (16, 16), (64, 64)])


def _n(p) -> int:
    return len(p.labels) if hasattr(p, "labels") else p.n


def _check_pattern(p, tiles, heads=(None,)):
    n = _n(p)
    for h in heads:
        check_schedule_exact(p, p.tile_schedule(n, n, *tiles, head=h), head=h)
    assert p.density(n, n) == pytest.approx(p.dense_mask(n, n).double().mean().item(), abs=1e-14)


# ---- strategies ----------------------------------------------------------------------------------------------
@st.composite
def maxvit(draw):
    ndim = draw(st.integers(1, 3))
    parts = [draw(st.integers(1, 4)) for _ in range(ndim)], [draw(st.integers(1, 4)) for _ in range(ndim)]
    grid = tuple(a * b for a, b in zip(*parts))  # every dim a multiple of the window (grid size)
    if draw(st.booleans()):
        return MaxViTBlock(grid, tuple(parts[0]))
    return MaxViTGrid(grid, tuple(parts[1]))


@st.composite
def halos(draw):
    ndim = draw(st.integers(1, 2))
    grid = tuple(draw(st.integers(1, {1: 60, 2: 14}[ndim])) for _ in range(ndim))
    block = tuple(draw(st.integers(1, g)) for g in grid)
    halo = tuple(draw(st.integers(0, 4)) for _ in grid)
    return Halo(grid, block, halo)


@st.composite
def conv_windows(draw):
    ndim = draw(st.integers(1, 3))
    grid = tuple(draw(st.integers(1, {1: 60, 2: 14, 3: 6}[ndim])) for _ in range(ndim))
    kernel = tuple(2 * draw(st.integers(0, 4)) + 1 for _ in grid)
    dilation = tuple(draw(st.integers(1, g)) for g in grid)
    return ConvWindow(grid, kernel, dilation)


@st.composite
def radials(draw):
    frames, tokens = draw(st.integers(1, 12)), draw(st.integers(1, 20))
    return Radial(frames, tokens, window=draw(st.integers(1, 2 * tokens)))


@st.composite
def shards(draw):
    heads = draw(st.integers(1, 5))
    return S2Shards(heads, draw(st.integers(1, 3)), draw(st.integers(1, 6)), block=draw(st.integers(1, 9)),
                    causal=draw(st.booleans()), dense_heads=draw(st.integers(0, heads)),
                    vertical=draw(st.sampled_from(["absolute", "relative"])), homo_head=draw(st.booleans()))


@st.composite
def cyclic_shifts(draw):
    base = draw(conv_windows())
    groups = draw(st.integers(1, 3))
    shifts = tuple(tuple(draw(st.integers(-2 * g, 2 * g)) for g in base.grid) for _ in range(groups))
    return CyclicShift(base, shifts, heads=groups * draw(st.integers(1, 2)))


@st.composite
def label_patterns(draw):
    n = draw(st.integers(1, 120))
    labels = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    if draw(st.booleans()):
        return RegionAttention(labels)
    return Isolation(labels, background_label=draw(st.integers(0, 5)))


# ---- exact schedules -----------------------------------------------------------------------------------------
@HYPOTHESIS
@given(p=maxvit(), tiles=TILES)
def test_maxvit_schedule_is_exact(p, tiles):
    _check_pattern(p, tiles)


@HYPOTHESIS
@given(p=halos(), tiles=TILES)
def test_halo_schedule_is_exact(p, tiles):
    _check_pattern(p, tiles)


@HYPOTHESIS
@given(p=conv_windows(), tiles=TILES)
def test_conv_window_schedule_is_exact(p, tiles):
    _check_pattern(p, tiles)


@HYPOTHESIS
@given(p=cyclic_shifts(), tiles=TILES)
def test_cyclic_shift_schedule_is_exact(p, tiles):
    _check_pattern(p, tiles, heads=range(p.heads) if p.heads else (None,))


@HYPOTHESIS
@given(p=radials(), tiles=TILES)
def test_radial_schedule_is_exact(p, tiles):
    _check_pattern(p, tiles)


@HYPOTHESIS
@given(p=shards(), n=st.integers(1, 90), tiles=TILES)
def test_s2_schedule_is_exact(p, n, tiles):
    for h in range(p.heads):
        check_schedule_exact(p, p.tile_schedule(n, n, *tiles, head=h), head=h)
    assert p.density(n, n) == pytest.approx(p.dense_mask(n, n).double().mean().item(), abs=1e-14)


@HYPOTHESIS
@given(p=label_patterns(), tiles=TILES)
def test_label_schedules_are_exact(p, tiles):
    _check_pattern(p, tiles)


def test_maxvit_grid_permutation_makes_groups_block_diagonal():
    p = MaxViTGrid((64, 64), 8)
    s = p.tile_schedule(4096, 4096)
    assert s.q_perm is not None
    assert (s.kv_tiles[:, 0] == torch.arange(64)).all() and s.kv_tiles.shape[1] == 1 and s.full.all()
    assert s.computed_pairs() == 4096 * 64  # exactly the attended pairs


# ---- semantics -----------------------------------------------------------------------------------------------
def _keys(p, q):
    return torch.nonzero(p.dense_mask(_n(p), _n(p))[0, q])[:, 0].tolist()


def test_maxvit_block_and_grid_semantics():
    # 1-D, 8 tokens: windows of 4; grid of 2 cells -> each token attends the tokens 4 apart (dilation 4)
    assert _keys(MaxViTBlock((8,), 4), 5) == [4, 5, 6, 7]
    assert _keys(MaxViTGrid((8,), 2), 5) == [1, 5]
    # 2-D 4 x 6, G = (2, 3): cells of 2 x 2; token (1, 3) = 9 attends rows {1, 3} x cols {1, 3, 5}
    assert _keys(MaxViTGrid((4, 6), (2, 3)), 9) == [7, 9, 11, 19, 21, 23]


def test_halo_semantics_crop_at_the_border():
    p = Halo((12,), 4, 2)  # blocks 0-3, 4-7, 8-11
    assert _keys(p, 0) == list(range(0, 6))  # 0-3 plus 2 after, cropped before 0
    assert _keys(p, 5) == list(range(2, 10))  # 4-7 plus 2 each side: (b + 2h) = 8 keys
    assert _keys(p, 11) == list(range(6, 12))
    p2 = Halo((8, 8), 4, 1)  # 2-D: the product of the per-axis windows
    rows = Halo((8,), 4, 1).dense_mask(8, 8)[0]
    assert torch.equal(p2.dense_mask(64, 64)[0], (rows[:, None, :, None] & rows[None, :, None, :]).reshape(64, 64))


def test_conv_window_is_the_cropped_dilated_receptive_field():
    p = ConvWindow((12,), 3, dilation=2)  # keys x - 2, x, x + 2 inside the grid
    assert [_keys(p, q) for q in (0, 1, 5, 11)] == [[0, 2], [1, 3], [3, 5, 7], [9, 11]]
    rows = ConvWindow((6,), 5).dense_mask(6, 6)[0]  # 2-D: the product of the per-axis windows
    assert torch.equal(ConvWindow((6, 6), 5).dense_mask(36, 36)[0],
                       (rows[:, None, :, None] & rows[None, :, None, :]).reshape(36, 36))
    assert _keys(ConvWindow((4,), 9), 0) == [0, 1, 2, 3]  # a kernel larger than the grid sees all of it


def test_cyclic_shift_windows_wrap_around_the_border():
    p = CyclicShift(ConvWindow((8,), 3), (1,))  # token t sits at (t + 1) % 8 on the rolled grid
    assert p.heads is None
    assert _keys(p, 0) == [0, 1, 7]  # the window of token 0 wraps to the far border
    assert _keys(p, 6) == [5, 6]  # token 6 sits at the rolled border: its window is cropped there
    multi = CyclicShift(ConvWindow((8,), 3), ((1,), (-1,)), heads=2)
    assert _keys_h(multi, 7, 0, n=8) == [0, 7] and _keys_h(multi, 7, 1, n=8) == [0, 6, 7]  # +1: 7 sits at the rolled border 0; -1: its window wraps to 0


def test_radial_window_halves_per_band():
    p = Radial(frames=9, tokens_per_frame=16, window=8)
    q = 4 * 16 + 8  # frame 4, position 8
    keys = torch.tensor(_keys(p, q))
    frame, x = keys // 16, keys % 16
    width = {f: int((frame == f).sum()) for f in range(9)}
    assert width[4] == width[3] == width[5] == 16  # d = 0, 1: |dx| <= 8 covers the frame
    assert width[2] == width[6] == 9  # d = 2: |dx| <= 4
    assert width[0] == width[8] == 5  # d = 4: |dx| <= 2 (band 2, 8 >> 2 = 2)
    assert (x[frame == 0] - 8).abs().max() == 2


def test_s2_head_offsets_follow_dkernel():
    p = S2Shards(heads=4, local_blocks=1, vertical_stride=4, block=1, causal=False, vertical="absolute")
    for h in range(4):  # vertical key blocks of head h: (j + h + 1) % 4 == 0
        assert _keys_h(p, 0, h) == sorted({0} | {j for j in range(16) if (j + h + 1) % 4 == 0})


def _dkernel_relative(heads, n_blocks, local, stride, causal, dense_heads):
    """DKernel's ``get_sparse_attn_mask`` relative branch, transcribed (block level, every sparse head alike)."""
    q = torch.arange(n_blocks)[:, None]
    k = torch.arange(n_blocks)[None, :]
    left, right = (local, 1) if causal else (local, local)
    lm = q - k - left + 1
    lm = lm * (lm > 0)
    rm = k - q - right + 1
    rm = rm * (rm > 0)
    sparse = (lm + rm) % stride == 0
    m = torch.stack([sparse if h < heads - dense_heads else torch.ones_like(sparse) for h in range(heads)])
    return m & (q >= k) if causal else m


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("local,stride,dense", [(1, 3, 0), (2, 4, 1), (3, 2, 2)], ids=["L1-s3", "L2-s4-d1", "L3-s2-d2"])
def test_s2_relative_homo_head_is_dkernels_relative_form(local, stride, dense, causal):
    p = S2Shards(4, local, stride, block=1, causal=causal, dense_heads=dense, vertical="relative", homo_head=True)
    assert torch.equal(p.dense_mask(23, 23), _dkernel_relative(4, 23, local, stride, causal, dense))


def test_s2_vertical_auto_is_dkernels_default():
    assert S2Shards(4, 1, 4, causal=True).vertical == "absolute"
    assert S2Shards(4, 1, 4, causal=False).vertical == "relative"
    assert S2Shards(4, 1, 4, causal=False) == S2Shards(4, 1, 4, causal=False, vertical="relative")


def test_s2_relative_form_is_shift_invariant_and_offset_per_head():
    p = S2Shards(4, local_blocks=2, vertical_stride=4, block=1, causal=False)  # relative by default
    m = p.dense_mask(40, 40)
    for h in range(4):  # the pattern depends on q - k only (away from the borders)
        assert torch.equal(m[h, 20, 10:31], m[h, 25, 15:36])
    # query 20: keys 19..21 local; past the window (excess e = |d| - 1), head h keeps (e + h) % 4 == 0
    for h in range(4):
        keys = {k for k in range(40) if abs(20 - k) < 2 or (abs(20 - k) - 1 + h) % 4 == 0}
        assert _keys_h(p, 20, h, n=40) == sorted(keys)


def _keys_h(p, q, h, n=16):
    return torch.nonzero(p.dense_mask(n, n)[h, q])[:, 0].tolist()


def test_isolation_semantics():
    p = Isolation([0, 1, 1, 2, 0, 2], background_label=0)
    assert _keys(p, 1) == [0, 1, 2, 4]  # subject 1 and the background
    assert _keys(p, 3) == [0, 3, 4, 5]  # subject 2 and the background, not subject 1
    assert _keys(p, 0) == [0, 4]  # the background attends the background only
    assert RegionAttention(torch.tensor([[0, 1], [1, 0]])) == Segments([0, 1, 1, 0])


# ---- the papers' structural claims ---------------------------------------------------------------------------
@pytest.mark.parametrize("grid,p,g", [((16, 16), 4, 4), ((8, 12), (4, 4), (2, 3)), ((24,), 6, 4)],
                         ids=["16x16-P4-G4", "8x12-P4x4-G2x3", "1d-24-P6-G4"])
def test_maxvit_block_then_grid_reaches_every_token(grid, p, g):
    n = math.prod(grid)
    block = MaxViTBlock(grid, p).dense_mask(n, n)[0].double()
    grid_ = MaxViTGrid(grid, g).dense_mask(n, n)[0].double()
    assert ((block @ grid_) > 0).all()  # a path q -> (block) -> (grid) -> k for every pair
    assert not (block > 0).all() and not (grid_ > 0).all()


def test_maxvit_two_steps_need_window_at_least_the_cell():
    # P = 2 < L / G = 4: the block cannot reach every offset of a cell, so some pairs stay unconnected
    block = MaxViTBlock((8,), 2).dense_mask(8, 8)[0].double()
    grid_ = MaxViTGrid((8,), 2).dense_mask(8, 8)[0].double()
    assert not ((block @ grid_) > 0).all()


@pytest.mark.parametrize("vertical", ["absolute", "relative"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("heads,stride", [(4, 4), (8, 4), (5, 3)], ids=["H4-s4", "H8-s4", "H5-s3"])
def test_s2_union_over_heads_covers_the_context(heads, stride, causal, vertical):
    n = 157
    p = S2Shards(heads, local_blocks=1, vertical_stride=stride, block=4, causal=causal, vertical=vertical)
    union = p.dense_mask(n, n).any(0)
    full = torch.ones(n, n, dtype=torch.bool)
    assert torch.equal(union, full.tril() if causal else full)
    assert p.density(n, n) < 0.5  # while every head alone stays sparse


@pytest.mark.parametrize("vertical", ["absolute", "relative"])
def test_s2_union_has_holes_with_fewer_heads_than_stride_or_homogeneous_heads(vertical):
    p = S2Shards(2, local_blocks=1, vertical_stride=4, block=4, vertical=vertical)
    assert not torch.equal(p.dense_mask(64, 64).any(0), torch.ones(64, 64, dtype=torch.bool).tril())
    homo = S2Shards(4, local_blocks=1, vertical_stride=4, block=4, vertical=vertical, homo_head=True)
    m = homo.dense_mask(64, 64)
    assert torch.equal(m.any(0), m[0]) and not torch.equal(m[0], torch.ones(64, 64, dtype=torch.bool).tril())


@pytest.mark.parametrize("vertical", ["absolute", "relative"])
def test_s2_a_few_dense_heads_are_dense_the_rest_sparse(vertical):
    p = S2Shards(6, local_blocks=1, vertical_stride=16, block=4, causal=False, dense_heads=2, vertical=vertical)
    m = p.dense_mask(90, 90)
    assert m[4:].all() and not m[:4].all((1, 2)).any()  # the last two heads see everything, the others do not
    assert m.any(0).all()  # so the union covers the context even though 6 heads < stride 16


def test_s2_dense_heads_are_causal_dense():
    p = S2Shards(4, 1, 8, block=4, dense_heads=1)
    m = p.dense_mask(40, 40)
    assert torch.equal(m[3], torch.ones(40, 40, dtype=torch.bool).tril())
    assert not torch.equal(m[0], m[3])


def test_radial_density_shrinks_like_log_n_over_n():
    # S tokens per frame fixed, frames doubling: each doubling adds one temporal band, which costs every query a
    # bounded number of keys (at most 2 * 2**r frames x (2 S / 2**r + 1) <= 6 S), so keys per query grow like
    # log n and the density like log n / n (dense attention would add n keys per query per doubling)
    S = 32
    frames = [8, 16, 32, 64, 128, 256]
    keys = [Radial(f, S).density(f * S, f * S) * f * S for f in frames]  # mean keys per query
    growth = [b - a for a, b in zip(keys, keys[1:])]
    assert all(0 < g <= 6 * S for g in growth), growth
    assert keys[-1] <= 3 * S + sum(2 * 2**r * (2 * S // 2**r + 1) for r in range(1, 8))
    densities = [kq / (f * S) for kq, f in zip(keys, frames)]
    assert all(a > b for a, b in zip(densities, densities[1:]))
    assert densities[-1] * (256 * S) / math.log2(256 * S) < 2 * densities[2] * (32 * S) / math.log2(32 * S)


# ---- the engine equals the reference (float64, forward and backward) -----------------------------------------
ENGINE_CASES = {
    "maxvit-block-12x9": MaxViTBlock((12, 9), (4, 3)),
    "maxvit-grid-12x9": MaxViTGrid((12, 9), (3, 3)),
    "halo-13x11-b4-h2": Halo((13, 11), 4, 2),
    "conv-window-11x13-k5-d2": ConvWindow((11, 13), 5, dilation=(2, 1)),
    "radial-7x37": Radial(7, 37),
    "radial-9x13-w3": Radial(9, 13, window=3),
    "s2-causal-H3": S2Shards(3, 2, 3, block=16, dense_heads=1),
    "s2-bidir-H2": S2Shards(2, 1, 2, block=24, causal=False),
    "s2-bidir-absolute-H3": S2Shards(3, 1, 4, block=10, causal=False, vertical="absolute", dense_heads=1),
    "s2-causal-relative-H2": S2Shards(2, 2, 3, block=7, vertical="relative"),
    "cyclic-shift-9x11": CyclicShift(ConvWindow((9, 11), 3, dilation=(2, 1)), directional_shifts(2, 3), heads=4),
    "region": RegionAttention(torch.arange(63 * 8).reshape(21, 24) % 5),
    "isolation": Isolation(torch.arange(501) % 7 // 2, background_label=1),
}


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_engine_matches_reference_float64(case):
    p = ENGINE_CASES[case]
    n = 157 if isinstance(p, S2Shards) else p.n if isinstance(p, CyclicShift) else _n(p)
    H = p.heads or 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = headwise.attention(q, k, v, p, backend="blocksparse")
    ref = headwise.attention(q, k, v, p, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((out * gout).sum(), (q, k, v))
    want = torch.autograd.grad((ref * gout).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=lambda m: f"d{name}: {m}")


def test_specs_build_the_patterns():
    assert from_spec("maxvit_block(window=4)", grid=(8, 8)) == MaxViTBlock((8, 8), 4)
    assert from_spec("maxvit_grid(grid_size=2)", grid=(8, 8)) == MaxViTGrid((8, 8), 2)
    assert from_spec("halo(block=4, halo=1)", grid=(8, 8)) == Halo((8, 8), 4, 1)
    assert from_spec("conv_window(kernel_size=3, dilation=2)", grid=(8, 8)) == ConvWindow((8, 8), 3, 2)
    assert from_spec("radial(frames=4, tokens_per_frame=16)") == Radial(4, 16)
    assert from_spec("s2(heads=4, local_blocks=2, vertical_stride=4)") == S2Shards(4, 2, 4)


def test_distinct_halos_are_distinct_plan_keys():
    # kernel sizes clip to the grid, so two halos may share Neighborhood fields; they must not compare equal
    a, b = Halo((8,), 4, 3), Halo((8,), 4, 5)
    assert a != b and not torch.equal(a.dense_mask(8, 8), b.dense_mask(8, 8))
    assert MaxViTBlock((8,), 4) != Neighborhood((8,), 4, stride=4)


# ---- errors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,needle", [
    (lambda: MaxViTBlock((8, 10), 4), "window"),
    (lambda: MaxViTGrid((8, 10), 3), "grid_size"),
    (lambda: MaxViTBlock((8, 8, 8, 8), 2), "grid"),
    (lambda: Halo((8, 8), 9, 1), "block"),
    (lambda: Halo((8, 8), 4, -1), "halo"),
    (lambda: ConvWindow((8, 8), 4), "kernel_size"),
    (lambda: ConvWindow((8, 8), 3, dilation=9), "dilation"),
    (lambda: Radial(0, 16), "frames"),
    (lambda: Radial(4, 16, window=0), "window"),
    (lambda: S2Shards(4, 0, 4), "local_blocks"),
    (lambda: S2Shards(4, 1, 0), "vertical_stride"),
    (lambda: S2Shards(4, 1, 4, dense_heads=5), "dense_heads"),
    (lambda: S2Shards(4, 1, 4, vertical="diagonal"), "vertical"),
    (lambda: S2Shards(4, 1, 4, homo_head=1), "homo_head"),
    (lambda: CyclicShift(ConvWindow((8, 8), 3), ((1, 1), (2, 2)), heads=3), "heads"),
    (lambda: CyclicShift(ConvWindow((8, 8), 3), ((1, 1, 1),)), "shift"),
    (lambda: CyclicShift(S2Shards(2, 1, 2), (1,)), "grid"),
    (lambda: directional_shifts(2, 0), "amount"),
    (lambda: Isolation([[0.5, 1.0]]), "subject_labels"),
    (lambda: Isolation([0, 1], background_label="bg"), "background_label"),
    (lambda: RegionAttention([]), "labels"),
], ids=["maxvit-block-divides", "maxvit-grid-divides", "grid-4d", "halo-block", "halo-negative", "conv-even",
        "conv-dilation", "radial-frames",
        "radial-window", "s2-local", "s2-stride", "s2-dense", "s2-vertical", "s2-homo", "shift-groups",
        "shift-length", "shift-needs-grid", "shift-amount", "isolation-float", "isolation-bg", "region-empty"])
def test_bad_arguments_raise_naming_them(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_wrong_lengths_and_missing_head_raise():
    with pytest.raises(ValueError, match="tokens_per_frame"):
        Radial(4, 16).tile_schedule(63, 63)
    with pytest.raises(ValueError, match="head"):
        S2Shards(2, 1, 2).tile_schedule(64, 64)
    with pytest.raises(ValueError, match="head=5"):
        S2Shards(2, 1, 2).mask(torch.tensor(0), torch.tensor(0), 5)
    with pytest.raises(ValueError, match="n_q == n_kv"):
        S2Shards(2, 1, 2).tile_schedule(64, 32, head=0)
    with pytest.raises(ValueError, match="labels"):
        Isolation([0, 1, 2]).tile_schedule(4, 4)
