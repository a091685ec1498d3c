"""The multi-head scan against the module written head by head and route by route
(:func:`headwise.variants.multihead_scan.naive_multihead_scan`), and its scan routes."""

import pytest
import torch

import headwise
from headwise.ops.scan import recurrent_selective_scan
from headwise.variants.multihead_scan import ROUTES, MultiHeadScan, naive_multihead_scan, scan_routes
from common import assert_all_params_get_grads, assert_same_forward_and_grads, rand


@pytest.mark.parametrize("family", list(ROUTES))
@pytest.mark.parametrize("h,w", [(1, 1), (3, 5), (4, 4)], ids=lambda v: str(v))
def test_scan_routes_are_permutations(family, h, w):
    r = scan_routes(family, h, w)
    assert r.shape == (4, h * w)
    for row in r:
        assert sorted(row.tolist()) == list(range(h * w))
    torch.testing.assert_close(r[1], r[0].flip(0))
    torch.testing.assert_close(r[3], r[2].flip(0))


def test_scan_routes_orders():
    assert scan_routes("raster", 2, 3)[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert scan_routes("raster", 2, 3)[2].tolist() == [0, 3, 1, 4, 2, 5]
    assert scan_routes("snake", 2, 3)[0].tolist() == [0, 1, 2, 5, 4, 3]
    assert scan_routes("diagonal", 2, 3)[0].tolist() == [0, 1, 3, 2, 4, 5]


@pytest.mark.parametrize("heads,H,W,chunk", [(4, 1, 1, 32), (4, 5, 7, 8), (3, 4, 4, 5), (2, 3, 9, 32), (2, 3, 9, 0)],
                         ids=lambda v: str(v))
def test_multihead_scan_matches_head_by_head_loop(heads, H, W, chunk):
    torch.manual_seed(0)
    m = MultiHeadScan(12, heads=heads, state=4, chunk=chunk, threshold=0.1).double()
    x = rand(2, 12, H, W, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_multihead_scan(m, x), [x, *m.parameters()], 1e-9, seed=3)


def test_scan_argument_replaces_the_configured_scan():
    """forward(x, scan=recurrent_selective_scan) on a chunked module: the same result through the reference."""
    torch.manual_seed(0)
    m = MultiHeadScan(8, heads=2, state=3, chunk=4).double()
    x = rand(1, 8, 3, 5)
    torch.testing.assert_close(m(x, scan=recurrent_selective_scan), m(x), rtol=1e-10, atol=1e-10)


def test_multihead_scan_grads_and_errors():
    m = headwise.create("multihead_scan(state=4)", dim=8, heads=4)
    out = m(torch.randn(2, 8, 4, 5))
    assert out.shape == (2, 8, 4, 5)
    assert_all_params_get_grads(m, out)
    with pytest.raises(ValueError, match="routes must be a non-empty tuple"):
        MultiHeadScan(8, routes=("spiral",))
    with pytest.raises(ValueError, match="head_dim defaults to dim // heads, which is 0"):
        MultiHeadScan(2, heads=4)
