"""complex (ComplexFormer CMHA) module: its polar-form reference, degenerate cases, causality, bad configs."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.patterns import Causal
from headwise.variants.complex import ComplexAttention, naive_complex
from headwise.variants.mha import MultiHeadAttention
from common import (
    ABS_TOL,
    assert_loads_old_checkpoint,
    assert_same_forward_and_grads,
    fused_checkpoint,
    rand,
    randomize_,
)

DIM, HEADS = 48, 4  # head_dim 12

@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("causal", ["none", "pattern", "field"])
def test_complex_matches_polar_reference(N, causal):
    torch.manual_seed(0)
    m = ComplexAttention(DIM, HEADS, pattern=Causal() if causal == "pattern" else None,
                         causal=causal == "field").double()
    randomize_(m)
    x = rand(2, N, DIM, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_complex(m, x), [x, *m.parameters()], ABS_TOL, seed=1)


def test_complex_without_rotation_equals_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(DIM, HEADS, pattern=Causal(), backend="reference").double()
    m = ComplexAttention(DIM, HEADS, pattern=Causal()).double()
    m.load_state_dict(mha.state_dict(), strict=False)
    with torch.no_grad():
        m.freq.zero_()  # phase_scale = 1, phase_shift = 0 from the init: Adapt is the identity
    x = rand(2, 63, DIM)
    torch.testing.assert_close(m(x), mha(x), atol=1e-12, rtol=0)


def test_fused_kv_checkpoints_still_load():
    torch.manual_seed(0)
    m = ComplexAttention(DIM, HEADS).double()
    randomize_(m)
    fresh = ComplexAttention(DIM, HEADS).double()
    assert_loads_old_checkpoint(fresh, fused_checkpoint(m.state_dict()), m, rand(2, 9, DIM))


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=50, heads=4), "dim must be divisible by heads"),
    (dict(head_dim=7), "even head_dim"),
    (dict(rope_base=1), "rope_base"),
    (dict(kv_heads=2), "kv_heads"),
    (dict(causal="no"), "causal"),
    (dict(backend="cuda"), "backend"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("complex", **kw)
