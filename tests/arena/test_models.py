import pytest
import torch

import headwise
from headwise.arena.models import (Unsupported, build_lm, build_regression, build_vit, count_params, plan_mixer,
                                   split_specs)
from headwise.variants.registry import register


def test_split_specs_commas_outside_parentheses():
    assert split_specs("mha(heads=1),moba(block=16, topk=2), linear") == [
        "mha(heads=1)", "moba(block=16, topk=2)", "linear"]
    assert split_specs("x(routes=('a', 'b')),y") == ["x(routes=('a', 'b'))", "y"]
    with pytest.raises(ValueError, match="malformed"):
        split_specs("mha(heads=1,linear")
    with pytest.raises(ValueError, match="no spec"):
        split_specs(" , ")


@pytest.mark.parametrize("spec, how", [("mha", "causal=True"), ("linear", "causal=True"),
                                       ("lightning", "causal by construction")], ids=["mha", "linear", "lightning"])
def test_causal_plan_from_the_declarations(spec, how):
    plan = plan_mixer(spec, dim=32, heads=4, seq_len=16, causal=True)
    assert plan.causal and plan.note == how and plan.layout == "tokens"


def test_lm_is_causal_end_to_end():
    torch.manual_seed(0)
    lm = build_lm("mha", vocab=32, dim=32, depth=2, heads=4, max_len=24, conv=3).double().eval()
    x = torch.randint(0, 32, (2, 24))
    y = lm(x)  # (B, N, V)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 32
    assert y.shape == (2, 24, 32)
    torch.testing.assert_close(lm(x2)[:, :10], y[:, :10], rtol=0, atol=1e-12)
    assert not torch.allclose(lm(x2)[:, 10:], y[:, 10:])


def test_non_causal_variant_is_refused_with_reason():
    with pytest.raises(Unsupported, match="nin_gate has no causal mode"):
        plan_mixer("nin_gate", dim=32, heads=4, seq_len=16, causal=True)
    with pytest.raises(Unsupported, match="hip is not causal here: .*later tokens"):
        plan_mixer("hip(block=8, topk=2, window=1)", dim=32, heads=4, seq_len=64, causal=True)
    with pytest.raises(Unsupported, match="no causal mode in this configuration"):
        plan_mixer("gaam(axis='tokens')", dim=32, heads=4, seq_len=16, causal=True)
    with pytest.raises(Unsupported, match="causal=False"):
        plan_mixer("linear(causal=False)", dim=32, heads=4, seq_len=16, causal=True)


def test_grid_variants_need_a_grid():
    with pytest.raises(Unsupported, match="2-D token grid"):
        plan_mixer("max_vit", dim=32, heads=4, seq_len=49)
    plan = plan_mixer("max_vit", dim=32, heads=4, seq_len=49, grid=(7, 7))
    assert plan.kwargs["grid"] == (7, 7)


def test_image_family_gets_feature_maps():
    plan = plan_mixer("lka(kernel_size=5, dilation=1)", dim=16, heads=4, seq_len=16, grid=(4, 4))
    assert plan.layout == "image"
    vit = build_vit("lka(kernel_size=5, dilation=1)", image_size=16, patch=4, dim=16, depth=1)
    assert vit(torch.randn(3, 1, 16, 16)).shape == (3, 10)
    with pytest.raises(Unsupported, match="B, C, H, W"):
        plan_mixer("lka", dim=16, heads=4, seq_len=16)  # no grid: a sequence cannot become a feature map


def test_tuple_output_and_extra_forward_args():
    plan = plan_mixer("multiscale_heads", dim=16, heads=2, seq_len=16, causal=True)  # returns one tensor per scale
    assert plan.causal and plan.layout == "tokens"  # the first, full-resolution output is the mixer's
    with pytest.raises(Unsupported, match="queries"):
        plan_mixer("window_cross", dim=32, heads=4, seq_len=49, grid=(7, 7))
    with pytest.raises(Unsupported, match="memory_dim"):
        plan_mixer("memory_attention", dim=32, heads=4, seq_len=16)


def test_unknown_variant_lists_the_registry():
    with pytest.raises(ValueError, match="available"):
        plan_mixer("nope", dim=32, heads=4, seq_len=16)


def test_new_registry_entry_is_picked_up():
    from dataclasses import dataclass

    from headwise.variants.base import Capabilities, Variant

    @register("_arena_test_mean_mixer")
    class MeanMixer(Variant):
        capabilities = Capabilities(causal="always", weights="none")

        @dataclass
        class Config:
            dim: int  # width

        def build(self, cfg):
            self.proj = torch.nn.Linear(cfg.dim, cfg.dim)

        def forward(self, x):
            return self.proj(x.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None])  # causal mean

    try:
        assert "_arena_test_mean_mixer" in headwise.available()
        lm = build_lm("_arena_test_mean_mixer", vocab=16, dim=16, depth=1, max_len=8)
        assert lm(torch.randint(0, 16, (2, 8))).shape == (2, 8, 16)
    finally:
        from headwise.variants import registry
        registry._REGISTRY.pop("_arena_test_mean_mixer")


def test_per_layer_specs_and_layer_index():
    lm = build_lm(["mha", "lightning"], vocab=16, dim=16, depth=2, heads=2, max_len=8)
    assert lm.blocks[1].mixer.inner.config.layer == 1 and lm.blocks[1].mixer.inner.config.num_layers == 2
    with pytest.raises(ValueError, match="depth=3"):
        build_lm(["mha", "mha"], vocab=16, dim=16, depth=3, max_len=8)


def test_regression_transformer_reads_the_query_y_slot():
    torch.manual_seed(0)
    model = build_regression("mha", d=5, heads=4, num_context=10)
    assert model.mixer.inner.config.head_dim == 8  # full-width heads, as the paper's (d+1)x(d+1) KQ matrices
    tokens = torch.randn(3, 11, 6)
    assert model(tokens).shape == (3,)
    one = build_regression("mha(heads=1)", d=5)
    assert one.mixer.inner.config.heads == 1
    assert count_params(one) < count_params(model)


def test_spec_pattern_is_intersected_with_causal():
    plan = plan_mixer("mha(pattern='window(window=3)')", dim=16, heads=2, seq_len=16, causal=True)
    mask = plan.create().pattern.dense_mask(16, 16)  # (N, N): the spec's band, cut to the past (causal=True)
    expected = torch.ones(16, 16, dtype=torch.bool).tril() & ~torch.ones(16, 16, dtype=torch.bool).tril(-4)
    assert plan.causal and torch.equal(mask.reshape(16, 16), expected)
