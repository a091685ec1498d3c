"""Compiled FlexAttention on CPU (slow: a compile takes ~10 s)."""

import pytest
import torch

from headwise.core import attention
from headwise.patterns import Causal, Neighborhood


@pytest.mark.slow
def test_compiled_flex_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=g) for _ in range(3))
    for p in (Neighborhood((16, 16), 5), Causal(offset=-8)):
        with torch.no_grad():
            got = attention(q, k, v, p, backend="flex")
        torch.testing.assert_close(got, attention(q, k, v, p, backend="reference"), atol=1e-5, rtol=0)


def test_compiled_flex_declines_lse_on_cpu(monkeypatch):
    monkeypatch.delenv("HEADWISE_FLEX_EAGER", raising=False)
    q = k = v = torch.randn(1, 2, 64, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="cannot run"):
        attention(q, k, v, Causal(), backend="flex", return_lse=True)


def test_compiled_flex_declines_short_sequences_on_cpu(monkeypatch):
    """torch 2.13's compiled CPU Flex gave wrong rows at N = 24 / 40 (see core/flex.py): declined, with a clear error."""
    monkeypatch.delenv("HEADWISE_FLEX_EAGER", raising=False)
    q = k = v = torch.randn(1, 2, 40, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="cannot run"):
        attention(q, k, v, Neighborhood((40,), 5), backend="flex")
