"""Cascaded group attention (EfficientViT) against its reference written out with the module's weights (float64)."""

import pytest
import torch

import headwise
from headwise.patterns import Causal, Full, PerHead
from headwise.variants.cascaded_group import CascadedGroupAttention, naive_cascaded
from headwise.variants.mha import MultiHeadAttention
from common import F64, assert_same_forward_and_grads

CASCADES = {
    "H4-1d-k5": dict(heads=4, N=37),
    "H4-grid5x7-k3": dict(heads=4, N=35, grid=(5, 7), kernel_size=3),
    "H2-1d-perhead": dict(heads=2, N=30, pattern=PerHead([Causal(), Causal(offset=-4)])),
    "H3-1d-causal-nobias": dict(heads=3, N=1, pattern=Causal(), qkv_bias=False),
}


@pytest.mark.parametrize("case", CASCADES, ids=list(CASCADES))
def test_cascaded_group_matches_naive(case):
    cfg = dict(CASCADES[case])
    N = cfg.pop("N")
    torch.manual_seed(0)
    dim = 32 if cfg["heads"] != 3 else 24
    m = CascadedGroupAttention(dim, qk_dim=6, **cfg).to(F64)
    x = torch.randn(2, N, dim, dtype=F64, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_cascaded(m, x), [x] + list(m.parameters()), allow_unused=True)


def test_cascade_feeds_each_head_the_previous_output():
    """Changing the first channel split changes every head's output (through the cascade), not only head 1's."""
    torch.manual_seed(0)
    m = CascadedGroupAttention(32, 4, qk_dim=6, proj_relu=False).to(F64)
    x = torch.randn(1, 12, 32, dtype=F64)
    y = x.clone()
    y[..., :8] += 1.0
    with torch.no_grad():
        m.proj.weight.copy_(torch.eye(32, dtype=F64)), m.proj.bias.zero_()
        d = (m(x) - m(y)).abs().amax(dim=(0, 1)).view(4, 8).amax(-1)  # per head
    assert (d > 1e-6).all()


def test_cascaded_one_group_is_single_head_attention():
    """One group, an identity 1x1 convolution and no ReLU: MultiHeadAttention with one head and the same weights."""
    torch.manual_seed(0)
    cga = CascadedGroupAttention(24, 1, qk_dim=24, kernel_size=1, proj_relu=False, pattern=Causal()).to(F64)
    mha = MultiHeadAttention(24, 1, pattern=Causal()).to(F64)
    w, b = cga.qkvs[0].weight, cga.qkvs[0].bias
    with torch.no_grad():
        cga.dws[0].weight.fill_(1.0), cga.dws[0].bias.zero_()
        for i, proj in enumerate((mha.q_proj, mha.k_proj, mha.v_proj)):
            proj.weight.copy_(w[24 * i : 24 * (i + 1)]), proj.bias.copy_(b[24 * i : 24 * (i + 1)])
        mha.out_proj.load_state_dict(cga.proj.state_dict())
    x = torch.randn(2, 19, 24, dtype=F64)
    torch.testing.assert_close(cga(x), mha(x), rtol=1e-12, atol=1e-12)


def test_the_query_convolution_is_not_causal():
    """Why ``cascaded_group`` declares no causal mode: even under a causal pattern, an output changes with the
    next token (through the centred convolution of the queries)."""
    assert CascadedGroupAttention.capabilities.causal == "none"
    torch.manual_seed(0)
    m = CascadedGroupAttention(16, 2, qk_dim=4, kernel_size=3, pattern=Causal()).to(F64)
    x = torch.randn(1, 9, 16, dtype=F64)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    assert (m(x2)[:, 4] - m(x)[:, 4]).abs().max() > 1e-6


def test_cascaded_grid_must_match_tokens():
    m = CascadedGroupAttention(16, 2, grid=(4, 4), kernel_size=3)
    with pytest.raises(ValueError, match=r"grid=\(4, 4\) does not multiply to N=15"):
        m(torch.randn(1, 15, 16))


def test_renamed_key_dim_and_bias_still_work():
    with pytest.warns(FutureWarning, match="key_dim= is renamed qk_dim="):
        m = headwise.create("cascaded_group(key_dim=6)", dim=16, heads=2)
    assert m.config.qk_dim == 6 and m.qkvs[0].out_features == 2 * 6 + 8
    with pytest.warns(FutureWarning, match=r"bias= is renamed qkv_bias= and out_bias="):
        m = CascadedGroupAttention(16, 2, bias=False)
    assert m.qkvs[0].bias is None and m.dws[0].bias is None and m.proj.bias is None
    m = CascadedGroupAttention(16, 2, out_bias=False)
    assert m.qkvs[0].bias is not None and m.dws[0].bias is not None and m.proj.bias is None


BAD = [
    (dict(dim=30, heads=4), ValueError, "divisible by heads"),
    (dict(dim=32, heads=4, kernel_size=4), ValueError, "kernel_size must be odd"),
    (dict(dim=32, heads=4, kernel_size=5, grid=(3, 8)), ValueError, r"kernel_size=5 exceeds grid=\(3, 8\)"),
    (dict(dim=32, heads=4, grid=(3,)), ValueError, "grid must be None or"),
    (dict(dim=32, heads=4, pattern=PerHead([Full(), Full()])), ValueError, "2 heads but heads=4"),
    (dict(dim=32, heads=4, qk_dim=0), ValueError, "qk_dim must be a positive int"),
]


@pytest.mark.parametrize("kw, exc, match", BAD, ids=[b[2][:24] for b in BAD])
def test_bad_config_raises(kw, exc, match):
    with pytest.raises(exc, match=match):
        headwise.create("cascaded_group", **kw)
