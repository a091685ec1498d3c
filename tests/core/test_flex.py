"""Compiled FlexAttention on CPU (slow: a compile takes ~10 s)."""

import pytest
import torch

from headwise.core import attention
from headwise.patterns import Neighborhood


@pytest.mark.slow
def test_compiled_flex_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=g) for _ in range(3))
    p = Neighborhood((16, 16), 5)
    with torch.no_grad():
        got = attention(q, k, v, p, backend="flex")
    torch.testing.assert_close(got, attention(q, k, v, p, backend="reference"), atol=1e-5, rtol=0)
