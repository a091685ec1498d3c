"""key_masked_attention: per-example key masks on every backend, against the reference; empty elements give zeros."""

import pytest
import torch

from headwise import patterns
from headwise.core.padding import key_masked_attention
from common import rand


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_key_masked_attention_sdpa_and_keymask_paths_agree(backend):
    """The dense SDPA path (no pattern, auto) and the per-mask KeyMask path give the same result; an element with
    no usable key gives zeros."""
    q, k, v = rand(3, 4, 6, 5), rand(3, 2, 7, 5, seed=1), rand(3, 2, 7, 5, seed=2)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0] * 7, [1] * 7], dtype=torch.bool)
    out = key_masked_attention(q, k, v, keep, None, backend)
    ref = key_masked_attention(q, k, v, keep, patterns.Causal(offset=100), "reference")  # a pattern allowing all
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert (out[1] == 0).all()


def test_matches_the_dense_mask_reference_with_a_pattern():
    from headwise.core.reference import masked_attention

    q, k, v = rand(3, 4, 6, 5), rand(3, 2, 6, 5, seed=1), rand(3, 2, 6, 5, seed=2)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0], [1] * 6], dtype=torch.bool)
    out = key_masked_attention(q, k, v, keep, patterns.Causal(), "auto")
    mask = patterns.Causal().dense_mask(6, 6)[None] & keep[:, None, None, :]  # (B, 1, N, M)
    ref, _ = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
