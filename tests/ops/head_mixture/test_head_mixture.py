"""The head mixture: the gather path against its dense reference, the reference against materialized attention,
and the restricted patterns (float64)."""

import pytest
import torch

from headwise.core.reference import naive_attention
from headwise.ops.head_mixture import (
    Restricted,
    dense_head_mixture,
    gather_head_mixture,
    restrict,
)
from headwise.patterns import Causal, Full, PerHead
from common import F64, assert_same_forward_and_grads


# (B, H, H_kv, N, M, pattern): odd sizes, GQA, cross-attention, causal, head-specific with empty rows
MIXTURES = {
    "B1-H4-N1": (1, 4, 4, 1, 1, None),
    "B2-H4-kv2-N63-causal": (2, 4, 2, 63, 63, Causal()),
    "B3-H6-kv3-N37-M50": (3, 6, 3, 37, 50, None),
    "B2-H4-N63-perhead": (2, 4, 4, 63, 63, PerHead([Causal(), Full(), Causal(offset=-5), Causal(offset=3)])),
    "B1-H4-N500-causal": (1, 4, 1, 500, 500, Causal()),
}


@pytest.mark.parametrize("backend", ["sdpa", "blocksparse", "auto"])
@pytest.mark.parametrize("case", MIXTURES, ids=list(MIXTURES))
def test_gather_matches_dense_reference(case, backend):
    """Gathering each head's tokens gives the dense masked mixture, forward and gradients (float64)."""
    B, H, H_kv, N, M, pattern = MIXTURES[case]
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, N, 8, dtype=F64, generator=gen, requires_grad=True)
    k = torch.randn(B, H_kv, M, 8, dtype=F64, generator=gen, requires_grad=True)
    v = torch.randn(B, H_kv, M, 5, dtype=F64, generator=gen, requires_grad=True)
    gates = torch.rand(B, N, H, dtype=F64, generator=gen, requires_grad=True)
    active = torch.rand(B, N, H, generator=gen) < 0.5
    active[:, :, 0] = True  # a shared head
    active[:, :, -1] = False  # a head no token uses
    out = gather_head_mixture(q, k, v, gates, active, pattern, backend=backend)
    ref = dense_head_mixture(q, k, v, gates, active, pattern, backend="reference")
    assert out.shape == (B, N, H, 5)
    assert out[~active].abs().max() == 0 if (~active).any() else True
    assert_same_forward_and_grads(out, ref, [q, k, v, gates], allow_unused=True)


def test_dense_reference_is_masked_weighted_attention():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 11, 4, dtype=F64, generator=gen) for _ in range(3))
    gates = torch.rand(2, 11, 3, dtype=F64, generator=gen)
    active = torch.rand(2, 11, 3, generator=gen) < 0.6
    ref = naive_attention(q, k, v, Causal())[0].transpose(1, 2) * (gates * active)[..., None]  # (B, N, H, D)
    torch.testing.assert_close(dense_head_mixture(q, k, v, gates, active, Causal()), ref, rtol=1e-12, atol=1e-12)


def test_mixture_rejects_bad_gates():
    q = k = v = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="gates must be"):
        gather_head_mixture(q, k, v, torch.ones(1, 2, 5), torch.ones(1, 5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="active must be a bool"):
        dense_head_mixture(q, k, v, torch.ones(1, 5, 2), torch.ones(1, 5, 2))


def test_restrict_keeps_the_pattern_where_nothing_changes():
    causal = Causal()
    assert restrict(None, 9, None, torch.tensor([0]), 2) is None
    assert restrict(Full(), 9, None, torch.tensor([0]), 2) is None
    assert restrict(causal, 9, None, torch.tensor([1]), 2) is causal  # head-independent: the fused kernels stay
    per_head = PerHead([Causal(), Causal(offset=-2)])
    assert restrict(per_head, 9, None, torch.arange(2), 2) is per_head


def test_restricted_rows_and_heads_are_the_base_mask_at_those_positions():
    base = PerHead([Causal(), Causal(offset=-2), Full()])
    full = base.dense_mask(11, 13)  # (3, 11, 13)
    rows, heads = torch.tensor([0, 4, 7, 10]), torch.tensor([1, 2])
    torch.testing.assert_close(Restricted(base, 11, rows, heads).dense_mask(4, 13), full[heads][:, rows])
    one = restrict(base, 11, rows, torch.tensor([1]), 3)  # one fixed head: head-independent
    assert one.heads is None
    torch.testing.assert_close(one.dense_mask(4, 13), full[1:2, rows])
    with pytest.raises(ValueError, match="restricted pattern holds 4 query rows"):
        one.dense_mask(5, 13)
