"""Neighborhood (NATTEN / GNA semantics): the predicate, its exact analytic tile schedule and layout, errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.patterns import Neighborhood, blocked

HYPOTHESIS = settings(max_examples=80, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def neighborhoods(draw, max_tokens=300):
    """Random grids of 1-3 dims with valid kernel sizes, strides, dilations and causal flags."""
    ndim = draw(st.integers(1, 3))
    max_len = {1: 70, 2: 20, 3: 8}[ndim]
    grid = [draw(st.integers(1, max_len)) for _ in range(ndim)]
    while math.prod(grid) > max_tokens:
        grid[grid.index(max(grid))] //= 2
    dilation = [draw(st.integers(1, max(1, size // 2))) if draw(st.booleans()) else 1 for size in grid]
    kernel = [draw(st.integers(1, size // d)) for size, d in zip(grid, dilation)]
    stride = [draw(st.integers(1, k)) for k in kernel]
    causal = [draw(st.booleans()) for _ in grid]
    return Neighborhood(tuple(grid), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal))


def keys_of(p: Neighborhood, query: int) -> list[int]:
    n = p.n
    return torch.nonzero(p.dense_mask(n, n)[0, query])[:, 0].tolist()


# ---- semantics ------------------------------------------------------------------------------------------------
def test_worked_example_from_the_docstring():
    # grid (9,), kernel 3, stride 2, dilation 2: group 0 = tokens 0 2 4 6 8, group 1 = tokens 1 3 5 7
    p = Neighborhood((9,), 3, stride=2, dilation=2)
    expected = [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [4, 6, 8], [3, 5, 7], [4, 6, 8], [3, 5, 7], [4, 6, 8]]
    assert [keys_of(p, q) for q in range(9)] == expected
    causal = Neighborhood((9,), 3, stride=2, dilation=2, causal=True)
    expected = [[0], [1], [0, 2], [1, 3], [2, 4], [3, 5], [2, 4, 6], [3, 5, 7], [4, 6, 8]]
    assert [keys_of(causal, q) for q in range(9)] == expected


def test_plain_neighborhood_shifts_at_borders():
    # kernel 3 on 6 tokens: the border windows shift inward instead of shrinking
    p = Neighborhood((6,), 3)
    assert [keys_of(p, q) for q in range(6)] == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [3, 4, 5]]
    # even kernel: one more key on the left of the centre
    p = Neighborhood((6,), 4)
    assert [keys_of(p, q) for q in range(6)] == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5], [2, 3, 4, 5]]


def test_blocked_is_stride_equal_to_kernel():
    p = blocked((10,), 4)
    assert p == Neighborhood((10,), 4, stride=4)
    # blocks 0-3 and 4-7; the partial block 8-9 takes the last 4 tokens of the axis
    assert [keys_of(p, q) for q in (0, 3, 4, 7, 8, 9)] == [[0, 1, 2, 3]] * 2 + [[4, 5, 6, 7]] * 2 + [[6, 7, 8, 9]] * 2


def test_2d_mask_is_the_product_of_per_axis_masks():
    p = Neighborhood((5, 7), (3, 4), stride=(1, 2), dilation=(1, 1), causal=(False, True))
    rows = Neighborhood((5,), 3).dense_mask(5, 5)[0]  # (5, 5)
    cols = Neighborhood((7,), 4, stride=2, causal=True).dense_mask(7, 7)[0]  # (7, 7)
    expected = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(35, 35)  # row-major flattening
    assert torch.equal(p.dense_mask(35, 35)[0], expected)


@HYPOTHESIS
@given(p=neighborhoods())
def test_key_counts_and_density(p):
    m = p.dense_mask(p.n, p.n)[0]  # (N, N)
    if not any(p.causal):
        assert (m.sum(1) == math.prod(p.kernel_size)).all()  # exactly prod(kernel_size) keys per query
    else:
        assert (m.sum(1) >= 1).all() and (m.sum(1) <= math.prod(p.kernel_size)).all()
        assert m.diagonal().all()  # a causal query always sees itself
    assert p.density(p.n, p.n) == pytest.approx(m.double().mean().item(), abs=1e-15)


def test_mask_broadcasts_over_index_tensors():
    p = Neighborhood((4, 6, 5), (3, 3, 5), stride=(1, 2, 1), dilation=(1, 2, 1), causal=(True, False, False))
    dense = p.dense_mask(p.n, p.n)[0]
    q = torch.tensor([0, 17, 64, 119])[:, None, None]  # (4, 1, 1)
    kv = torch.arange(p.n).view(1, 10, 12)  # (1, 10, 12)
    got = p.mask(q, kv)
    assert got.shape == (4, 10, 12)
    assert torch.equal(got.reshape(4, -1), dense[q.flatten()])


# ---- the tile schedule --------------------------------------------------------------------------------------------
@HYPOTHESIS
@given(p=neighborhoods(), tile_q=st.integers(1, 40), tile_kv=st.integers(1, 40))
def test_schedule_matches_exhaustive(p, tile_q, tile_kv, schedule_exact):
    schedule_exact(p, p.tile_schedule(p.n, p.n, tile_q, tile_kv))


@HYPOTHESIS
@given(p=neighborhoods(), data=st.data())
def test_schedule_matches_exhaustive_with_any_tile_shape(p, data, schedule_exact):
    shape = tuple(data.draw(st.integers(1, 2 * size)) for size in p.grid)  # boxes may overhang the axis
    schedule_exact(p, p.tile_schedule(p.n, p.n, tile_shape=shape))


@HYPOTHESIS
@given(p=neighborhoods(), tile_q=st.integers(1, 40))
def test_schedule_layout(p, tile_q):
    s = p.tile_schedule(p.n, p.n, tile_q)
    if p.ndim == 1 and p.dilation == (1,):
        assert s.q_perm is None and s.kv_perm is None
        assert torch.equal(s.q_bounds, torch.tensor(list(range(0, p.n, tile_q)) + [p.n]))
        return
    box = p.tile_shape(tile_q)
    assert math.prod(box) <= tile_q
    assert s.kv_perm is s.q_perm and torch.equal(s.kv_bounds, s.q_bounds)  # key boxes are the query boxes
    perm = torch.arange(p.n) if s.q_perm is None else s.q_perm
    coords = torch.stack(torch.unravel_index(perm, p.grid), 1)  # (N, D) grid coordinates in schedule order
    dilation, box = torch.tensor(p.dilation), torch.tensor(box)
    group, inner = coords % dilation, coords // dilation  # (N, D) dilation group, coordinates within it
    sizes = s.q_bounds.diff()
    tile = (torch.arange(p.n)[:, None] >= s.q_bounds[None, 1:]).sum(1)  # (N,) tile of each position
    assert (group == group[s.q_bounds[tile]]).all()  # one dilation group per tile
    group_index = (group * torch.tensor([math.prod(p.dilation[i + 1:]) for i in range(p.ndim)])).sum(1)
    assert (group_index.diff() >= 0).all()  # tiles ordered by group
    lowest = torch.full((s.n_q_tiles, p.ndim), p.n).scatter_reduce(0, tile[:, None].expand_as(inner), inner, "amin")
    highest = torch.full((s.n_q_tiles, p.ndim), -1).scatter_reduce(0, tile[:, None].expand_as(inner), inner, "amax")
    extent = highest - lowest + 1  # (T, D)
    assert (extent <= box).all() and torch.equal(extent.prod(1), sizes)  # each tile is a whole box
    assert (lowest % box == 0).all()  # on the box grid
    same_tile = tile[1:] == tile[:-1]
    assert (perm.diff()[same_tile] > 0).all()  # row-major within the box


# Shapes of the benchmark cases, scaled down so the exhaustive check stays fast.
BENCH_LIKE = {
    "1d-N2048-k513": Neighborhood((2048,), 513),
    "1d-causal-N2048-k513": Neighborhood((2048,), 513, causal=True),
    "1d-blocked-N2048-k512": blocked((2048,), 512),
    "2d-48x48-k17": Neighborhood((48, 48), 17),
    "2d-40x44-k9-s3-d2": Neighborhood((40, 44), 9, stride=3, dilation=2),
    "3d-8x16x16-k5x9x9": Neighborhood((8, 16, 16), (5, 9, 9)),
    "3d-6x10x12-causal-t": Neighborhood((6, 10, 12), (3, 5, 5), causal=(True, False, False)),
}


@pytest.mark.parametrize("name", BENCH_LIKE)
def test_schedule_matches_exhaustive_at_benchmark_shapes(name, schedule_exact):
    p = BENCH_LIKE[name]
    schedule_exact(p, p.tile_schedule(p.n, p.n))


def test_tile_shape_for_the_benchmark_kernels():
    assert Neighborhood((128, 128), 17).tile_shape(64) == (4, 8)
    assert Neighborhood((16, 32, 32), (5, 9, 9)).tile_shape(64) == (2, 4, 4)


def test_tile_shape_minimises_the_cost_model():
    p = Neighborhood((40, 36), (9, 7), stride=(1, 2))

    def score(shape):
        rows = shape[0] * shape[1]
        return p.tile_schedule(p.n, p.n, tile_shape=shape).computed_pairs() * (1 + p.ROW_COST / rows)

    best = score(p.tile_shape(32))
    for a in range(1, 33):
        for b in range(1, 33):
            if 8 <= a * b <= 32 and b % 2 == 0:  # the candidates: >= tile_q / 4 tokens, aligned with stride 2
                assert score((a, b)) >= best - 1e-6, (a, b)


def test_tile_shape_prefers_whole_blocks():
    # blocked windows of 12 in each dilation group: tiles of 12 fall on whole blocks, so no tile is partial
    p = blocked((96,), 12, dilation=2)
    assert p.tile_shape(16) == (12,)
    s = p.tile_schedule(p.n, p.n, 16)
    assert s.full[s.visited].all() and s.computed_pairs() == p.n * 12


def test_tile_shape_override_and_identity_permutation():
    p = Neighborhood((12, 10), 3)
    s = p.tile_schedule(p.n, p.n, tile_shape=(2, 10))  # whole rows: the permutation is the identity
    assert s.q_perm is None and s.q_bounds.diff().tolist() == [20] * 6
    with pytest.raises(ValueError, match="tile_shape"):
        p.tile_schedule(p.n, p.n, tile_shape=(4,))


def test_1d_keeps_token_order_and_separate_tile_sizes():
    p = Neighborhood((100,), 9, stride=3, causal=True)
    s = p.tile_schedule(100, 100, 16, 8)
    assert s.q_perm is None and s.kv_perm is None
    assert s.q_bounds.diff().tolist() == [16] * 6 + [4] and s.kv_bounds.diff().tolist() == [8] * 12 + [4]


# ---- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(grid=(4, 4, 4, 4), kernel_size=3), "grid"),
        (dict(grid=(), kernel_size=3), "grid"),
        (dict(grid=(8, 0), kernel_size=1), "grid"),
        (dict(grid=(8, 8), kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(grid=(8, 8), kernel_size=0), "kernel_size"),
        (dict(grid=(8, 8), kernel_size=(3, 9)), "kernel_size=\\(3, 9\\) exceeds grid"),
        (dict(grid=(8, 8), kernel_size=3, dilation=3), "dilation"),
        (dict(grid=(8, 8), kernel_size=3, dilation=(1, -1)), "dilation"),
        (dict(grid=(8, 8), kernel_size=3, stride=4), "stride=4 exceeds kernel_size"),
        (dict(grid=(8, 8), kernel_size=3, stride=0), "stride"),
        (dict(grid=(8, 8), kernel_size=3, causal=(True,)), "causal"),
        (dict(grid=(8, 8), kernel_size=3, causal=1), "causal"),
        (dict(grid=(8, 8), kernel_size=2.5), "kernel_size"),
    ],
    ids=["4-dims", "no-dims", "zero-axis", "kernel-dims", "kernel-zero", "kernel-too-big", "dilated-too-big",
         "negative-dilation", "stride-too-big", "stride-zero", "causal-dims", "causal-not-bool", "kernel-float"],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Neighborhood(**kwargs)


def test_grid_must_multiply_to_the_sequence_length():
    p = Neighborhood((8, 8), 3)
    with pytest.raises(ValueError, match="grid=\\(8, 8\\) does not multiply"):
        p.dense_mask(63, 63)
    with pytest.raises(ValueError, match="grid"):
        p.tile_schedule(64, 65)


def test_int_grid_and_lists_are_normalised():
    p = Neighborhood(16, [5], dilation=[2], causal=[True])
    assert p == Neighborhood((16,), 5, dilation=2, causal=True) and hash(p) == hash(Neighborhood((16,), 5, 1, 2, True))
