"""The Kinetics decoding cost model on a tiny configuration worked out by hand."""

import math

import pytest

from headwise.simulate.kinetics import ModelShape, decode_cost

# P = 1000, L = 2, H = 4, H_kv = 2 (r = 2), d = 8: D = 2 L H_kv d = 64 cached elements per token
TINY = ModelShape(params=1000, layers=2, heads=4, kv_heads=2, head_dim=8)
KW = dict(context=100, batch=2, bytes_per_element=2.0, flops_per_byte=10.0)


def test_tiny_model_shape():
    assert TINY.gqa_ratio == 2 and TINY.kv_per_token == 64


def test_dense_by_hand():
    c = decode_cost(TINY, **KW)
    d = c.dense
    assert d.attended == 100
    assert d.linear_flops == 2 * 1000 * 2 == 4000
    assert d.attention_flops == 2 * 2 * 64 * 100 * 2 == 4 * 2 * 4 * 8 * 100 * 2 == 51200
    assert d.kv_bytes == 64 * 100 * 2 * 2 == 25600
    assert d.weights_bytes == 2000
    assert d.eflops == 4000 + 51200 + 10 * 25600 == 311200
    assert d.eflops_per_token == 155600
    assert d.attention_share == pytest.approx(307200 / 311200, rel=1e-15)
    assert c.sparse is None and c.eflops_speedup is None


def test_topk_by_density_by_hand():
    c = decode_cost(TINY, density=0.25, **KW)
    s = c.sparse
    assert s.kind == "top-k" and s.attended == 25
    assert s.attention_flops == 12800 and s.kv_bytes == 6400 and s.selection_flops == 0
    assert s.eflops == 4000 + 12800 + 64000 == 80800
    assert c.attention_flops_ratio == 4.0 and c.kv_bytes_ratio == 4.0
    assert c.eflops_speedup == 311200 / 80800


def test_block_topk_by_hand():
    # 25 tokens -> 4 blocks of 8 = 32 tokens; scoring ceil(100 / 8) = 13 mean keys of D / 2 = 32 elements
    c = decode_cost(TINY, density=0.25, block=8, **KW)
    s = c.sparse
    assert s.kind == "block top-k" and s.attended == 32
    assert s.attention_flops == 2 * 2 * 64 * 32 * 2 == 16384
    assert s.kv_bytes == 64 * 32 * 2 * 2 == 8192
    assert s.selection_flops == 2 * 2 * 32 * 13 * 2 == 3328
    assert s.selection_bytes == 32 * 13 * 2 * 2 == 1664
    assert s.eflops == 4000 + 16384 + 3328 + 10 * (8192 + 1664) == 122272
    assert c.kv_bytes_ratio == 25600 / (8192 + 1664)
    assert c.attention_flops_ratio == 51200 / (16384 + 3328)


def test_topk_budget_is_capped_at_the_context():
    c = decode_cost(TINY, topk=500, **KW)
    assert c.sparse.attended == 100 and c.eflops_speedup == 1.0
    c = decode_cost(TINY, topk=30, block=16, **KW)  # 2 blocks of 16
    assert c.sparse.attended == 32


def test_attention_dominates_long_decoding():
    # the paper's point: at long contexts the KV traffic, not the parameters, sets the cost
    m = ModelShape(params=8e9, layers=36, heads=32, kv_heads=8, head_dim=128)
    short, long = decode_cost(m, context=1024), decode_cost(m, context=32768)
    assert short.dense.attention_share < long.dense.attention_share
    assert long.dense.attention_share > 0.9
    assert math.isclose(decode_cost(m, context=32768, density=1 / 16).kv_bytes_ratio, 16.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(context=0), "context"),
    (dict(context=10, batch=0), "batch"),
    (dict(context=10, density=0.0), "density"),
    (dict(context=10, density=1.5), "density"),
    (dict(context=10, density=0.5, topk=3), "not both"),
    (dict(context=10, block=4), "sparse budget"),
    (dict(context=10, topk=0), "topk"),
    (dict(context=10, bytes_per_element=0), "bytes_per_element"),
], ids=["context", "batch", "density0", "density>1", "both", "block-alone", "topk0", "bytes"])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_cost(TINY, **kwargs)


def test_bad_model():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        ModelShape(params=1e9, layers=2, heads=6, kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="params"):
        ModelShape(params=0, layers=2, heads=4, kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="layers"):
        ModelShape(params=1e9, layers=1.5, heads=4, kv_heads=4, head_dim=8)
    with pytest.raises(TypeError, match="ModelShape"):
        decode_cost("8b", context=10)
