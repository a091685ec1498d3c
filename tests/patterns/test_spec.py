"""Patterns from spec strings: names, defaults, overrides and errors."""

import pytest

from headwise.patterns import PATTERNS, Causal, Full, Neighborhood, Segments, SlidingWindow, blocked, from_spec


@pytest.mark.parametrize(
    "spec, defaults, expected",
    [
        ("full", {}, Full()),
        ("causal(offset=-2)", {}, Causal(-2)),
        ("neighborhood(kernel_size=17)", dict(grid=(128, 128)), Neighborhood((128, 128), 17)),
        ("neighborhood(kernel_size=(3, 5), stride=(1, 5), dilation=2, causal=(True, False))", dict(grid=(16, 20)),
         Neighborhood((16, 20), (3, 5), (1, 5), 2, (True, False))),
        ("neighborhood(grid=[8, 8], kernel_size=[3, 3])", dict(grid=(128, 128)), Neighborhood((8, 8), 3)),
        ("blocked(kernel_size=512)", dict(grid=(16384,)), blocked((16384,), 512)),
        ("window(window=256, causal=True)", dict(grid=(128, 128)), SlidingWindow(256, True)),
        ("segments(labels=[0, 0, 1])", {}, Segments([0, 0, 1])),
        ("causal", dict(grid=(4, 4), kernel_size=3), Causal()),
    ],
    ids=["full", "causal-offset", "neighborhood-grid-default", "neighborhood-per-dim", "spec-overrides-default",
         "blocked", "window-ignores-grid", "segments", "defaults-only-where-accepted"],
)
def test_from_spec(spec, defaults, expected):
    assert from_spec(spec, **defaults) == expected


def test_blocked_sets_stride_to_kernel():
    p = from_spec("blocked(kernel_size=(4, 8))", grid=(16, 16))
    assert p.stride == (4, 8) and p.kernel_size == (4, 8)


def test_registry_names():
    assert {"full", "causal", "neighborhood", "blocked", "window", "segments"} <= set(PATTERNS)


@pytest.mark.parametrize(
    "spec, defaults, fragment",
    [
        ("swin(window=7)", {}, "unknown pattern 'swin'.*valid names: full, causal, neighborhood"),
        ("window(size=3)", {}, "unknown key 'size' for pattern 'window'.*valid keys: window, causal"),
        ("neighborhood(kernel_size=3)", {}, "pattern 'neighborhood' needs grid"),
        ("neighborhood(grid=(8, 8), kernel_size=9)", {}, "kernel_size=9 exceeds grid"),
        ("window(window=", {}, "malformed"),
    ],
    ids=["unknown-name", "unknown-key", "missing-grid", "invalid-value", "malformed"],
)
def test_errors(spec, defaults, fragment):
    with pytest.raises(ValueError, match=fragment):
        from_spec(spec, **defaults)
