"""NiNformer's mixer gating unit against its equations written out (:func:`headwise.variants.nin_gate.naive_nin_gate`)."""

import pytest
import torch

import headwise
from headwise.variants.nin_gate import MixerGatingUnit, naive_nin_gate
from common import assert_all_params_get_grads, rand


@pytest.mark.parametrize("N,C", [(1, 4), (7, 6), (63, 8)], ids=lambda v: str(v))
def test_nin_gate_matches_equations(N, C):
    torch.manual_seed(0)
    m = MixerGatingUnit(C, tokens=N, token_hidden=5).double()
    with torch.no_grad():  # non-trivial norms
        for ln in (m.token_norm, m.channel_norm):
            ln.weight.normal_()
            ln.bias.normal_()
    x = rand(3, N, C)
    torch.testing.assert_close(m(x), naive_nin_gate(m, x), rtol=1e-12, atol=1e-12)


def test_nin_gate_gate_depends_on_other_tokens():
    """Token mixing: changing token 0 changes the output at token 1 (a per-token layer would not)."""
    m = MixerGatingUnit(4, tokens=5).double()
    x = rand(1, 5, 4)
    y = x.clone()
    y[:, 0] += rand(4, seed=5)  # not a constant shift, which LayerNorm would remove
    assert (m(x)[:, 1] - m(y)[:, 1]).abs().max() > 1e-6


def test_nin_gate_grads_defaults_and_errors():
    m = headwise.create("nin_gate(tokens=9)", dim=4)
    assert m.config.token_hidden == m.config.channel_hidden == 16
    assert_all_params_get_grads(m, m(torch.randn(2, 9, 4)))
    with pytest.raises(ValueError, match=r"x must have N = tokens = 9 tokens"):
        m(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\), got dropout=1.5"):
        MixerGatingUnit(4, tokens=3, dropout=1.5)
    with pytest.raises(TypeError, match="tokens must be a positive int"):
        MixerGatingUnit(4, tokens=2.5)
