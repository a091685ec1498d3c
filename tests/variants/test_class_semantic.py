"""class_semantic (CSA) against the equations written out per time step
(:func:`headwise.variants.class_semantic.naive_class_semantic`), its degenerate identity case,
gradients to every parameter, and errors."""

import pytest
import torch

import headwise
from headwise.variants.class_semantic import ClassSemanticAttention, naive_class_semantic
from common import assert_all_params_get_grads, assert_same_forward_and_grads, rand


@pytest.mark.parametrize("B,T,C,S,k", [(2, 1, 8, 8, 3), (1, 63, 12, 5, 5), (3, 17, 4, 9, 1)],
                         ids=["B2-T1-C8-S8-k3", "B1-T63-C12-S5-k5", "B3-T17-C4-S9-k1"])
def test_matches_naive_forward_and_backward(B, T, C, S, k):
    torch.manual_seed(0)
    m = ClassSemanticAttention(C, semantic_dim=S, hidden=6, kernel_size=k).double()
    x = rand(B, T, C, seed=1, requires_grad=True)
    r = rand(B, T, S, seed=2, requires_grad=True)
    out, ref = m(x, r), naive_class_semantic(m, x, r)
    assert out.shape == (B, T, C)
    assert_same_forward_and_grads(out, ref, [x, r, *m.parameters()], dict(rtol=0, atol=1e-12), seed=3)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(1)
    m = ClassSemanticAttention(8, semantic_dim=4).double()
    assert_all_params_get_grads(m, m(rand(2, 9, 8, seed=4), rand(2, 9, 4, seed=5)), seed=6)


def test_zero_gates_are_the_identity():
    m = ClassSemanticAttention(6, semantic_dim=3).double()
    with torch.no_grad():
        for lin in (m.channel_gate, m.temporal_gate):
            lin.weight.zero_()
            lin.bias.zero_()
    x = rand(2, 11, 6, seed=7)
    assert torch.equal(m(x, rand(2, 11, 3, seed=8)), x)  # both gates are exactly 1/2


def test_scores_come_from_the_semantics_not_the_features():
    torch.manual_seed(2)
    m = ClassSemanticAttention(6, semantic_dim=3).double()
    r = rand(1, 7, 3, seed=9)
    x1, x2 = rand(1, 7, 6, seed=10), rand(1, 7, 6, seed=11)
    channel, temporal = m.scores(r)
    assert channel.shape == (1, 1, 6) and temporal.shape == (1, 7, 1)
    assert ((channel > 0) & (channel < 1)).all() and ((temporal > 0) & (temporal < 1)).all()
    torch.testing.assert_close(m(x1, r) / x1, m(x2, r) / x2)  # the same gates multiply any features


def test_self_gating_and_spec():
    m = headwise.create("class_semantic(kernel_size=5)", dim=16)
    assert m.caps.inputs == () and ClassSemanticAttention(8, semantic_dim=4).caps.inputs == ("semantics",)
    assert (m.config.semantic_dim, m.config.hidden) == (16, 4)
    x = torch.randn(2, 10, 16)
    torch.testing.assert_close(m(x), m(x, x))


@pytest.mark.parametrize("make,error,needle", [
    (lambda: ClassSemanticAttention(0), ValueError, "dim"),
    (lambda: ClassSemanticAttention(8, kernel_size=4), ValueError, "kernel_size"),
    (lambda: ClassSemanticAttention(8, hidden=0), ValueError, "hidden"),
    (lambda: ClassSemanticAttention(8, semantic_dim=True), TypeError, "semantic_dim"),
], ids=["dim", "even-kernel", "hidden", "semantic-bool"])
def test_bad_config_raises(make, error, needle):
    with pytest.raises(error, match=needle):
        make()


def test_bad_inputs_raise():
    m = ClassSemanticAttention(8, semantic_dim=4)
    with pytest.raises(ValueError, match="semantics is required"):
        m(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="semantics"):
        m(torch.randn(1, 5, 8), torch.randn(1, 6, 4))
    with pytest.raises(ValueError, match="T >= 1"):
        m(torch.randn(1, 0, 8), torch.randn(1, 0, 4))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 5, 7), torch.randn(1, 5, 4))
    with pytest.raises(TypeError, match="semantics"):
        m(torch.randn(1, 5, 8), [[0.0]])
