"""ULSAM against the paper's per-subspace loop (:meth:`SubspaceAttention.naive_forward`), forward and gradients."""

import pytest
import torch

import headwise
from headwise.variants.ulsam import SubspaceAttention
from common import F64, assert_all_params_get_grads, rand


@pytest.mark.parametrize("C,g,H,W", [(8, 1, 1, 1), (8, 4, 7, 5), (12, 3, 9, 9), (16, 16, 4, 6)],
                         ids=lambda v: str(v))
def test_ulsam_matches_per_subspace_loop(C, g, H, W):
    torch.manual_seed(0)
    m = SubspaceAttention(C, groups=g).double()
    x = rand(2, C, H, W).requires_grad_()
    out, ref = m(x), m.naive_forward(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    wrt = [x, *m.parameters()]
    for a, b in zip(torch.autograd.grad(out.sum() + (out ** 2).sum(), wrt),
                    torch.autograd.grad(ref.sum() + (ref ** 2).sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ulsam_attention_map_is_a_spatial_softmax():
    """Per subspace, out - x = A * x with A >= 0 summing to 1 over positions: recover A from a constant input."""
    m = SubspaceAttention(4, groups=2).double()
    x = torch.ones(1, 4, 5, 6, dtype=F64)
    a = m(x) - x  # (1, 4, 5, 6): A_n broadcast over the subspace's channels
    torch.testing.assert_close(a.sum((-1, -2)), torch.ones(1, 4, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[:, 0], a[:, 1])


def test_ulsam_grads_and_bad_config():
    m = headwise.create("ulsam(groups=2)", dim=6)
    assert_all_params_get_grads(m, m(torch.randn(2, 6, 5, 5)))
    with pytest.raises(ValueError, match="dim must be divisible by groups, got dim=6 groups=4"):
        SubspaceAttention(6, groups=4)
