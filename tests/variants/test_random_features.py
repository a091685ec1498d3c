"""random_features (Fu et al., 2023): frozen random query-key heads, trainable values only."""

from __future__ import annotations

import pytest
import torch

import headwise
from headwise.variants.random_features import RandomFeatureAttention, naive_random_feature_attention, sample_query_key
from common import assert_same_forward_and_grads, rand

DIM, HEADS = 24, 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_shape_and_dtype(dtype):
    m = headwise.create("random_features(seed=0)", dim=DIM, heads=HEADS).to(dtype)
    y = m(torch.randn(3, 17, DIM, dtype=dtype))
    assert y.shape == (3, 17, DIM) and y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("N", [1, 63])
@pytest.mark.parametrize("qk_mean", [0.0, 2.0])
def test_matches_naive_forward_and_backward(N, qk_mean):
    torch.manual_seed(0)
    m = RandomFeatureAttention(DIM, HEADS, qk_mean=qk_mean, seed=3).double()
    x = rand(2, N, DIM, requires_grad=True)
    assert_same_forward_and_grads(m(x), naive_random_feature_attention(m, x), [x, m.out_proj.weight],
                                  dict(rtol=0, atol=1e-12), seed=1)


def test_only_values_train():
    m = RandomFeatureAttention(DIM, HEADS, seed=0)
    assert [n for n, _ in m.named_parameters()] == ["out_proj.weight"]
    assert "query_key" in m.state_dict() and not m.query_key.requires_grad
    frozen = m.query_key.clone()
    m(rand(2, 63, DIM, dtype=torch.float32, requires_grad=True)).square().sum().backward()
    assert m.out_proj.weight.grad is not None and m.out_proj.weight.grad.abs().sum() > 0
    assert m.query_key.grad is None
    torch.optim.SGD(m.parameters(), lr=1.0).step()
    assert torch.equal(m.query_key, frozen)


def test_seed_fixes_the_draw():
    a = RandomFeatureAttention(DIM, HEADS, seed=5)
    b = RandomFeatureAttention(DIM, HEADS, seed=5)
    c = RandomFeatureAttention(DIM, HEADS, seed=6)
    assert torch.equal(a.query_key, b.query_key) and not torch.equal(a.query_key, c.query_key)
    torch.manual_seed(11)
    d = RandomFeatureAttention(DIM, HEADS)  # seed=None: torch's global RNG
    torch.manual_seed(11)
    e = RandomFeatureAttention(DIM, HEADS)
    assert torch.equal(d.query_key, e.query_key) and torch.equal(d.out_proj.weight, e.out_proj.weight)


def test_sampling_distribution():
    g = torch.Generator().manual_seed(0)
    W = sample_query_key(heads=64, dim=32, mean=1.5, std=0.5, generator=g)  # (64, 32, 32)
    eye = torch.eye(32, dtype=torch.bool)
    diag, off = W[:, eye], W[:, ~eye]  # 2048 and 63488 samples
    assert abs(diag.mean().item() - 1.5) < 0.05 and abs(off.mean().item()) < 0.01
    assert abs(off.std().item() - 0.5) < 0.01 and abs(diag.std().item() - 0.5) < 0.03
    torch.testing.assert_close(sample_query_key(2, 4, mean=-0.7, std=0.0), -0.7 * torch.eye(4).expand(2, 4, 4))


def test_mean_identity_attends_by_similarity():
    # W = mu I with a large mu: each token's scores are mu <x_n, x_i> / C, peaked at i = n (its own norm)
    m = RandomFeatureAttention(DIM, 1, qk_mean=200.0, qk_std=0.0).double()
    with torch.no_grad():
        m.out_proj.weight.copy_(torch.eye(DIM))
    x = rand(1, 10, DIM)
    torch.testing.assert_close(m(x), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(qk_std=-1.0), "qk_std must be >= 0"),
    (dict(qk_mean=float("nan")), "qk_mean"),
    (dict(seed="a"), "seed"),
    (dict(heads=0), "heads"),
    (dict(backend="cuda"), "backend"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_raises_naming_the_argument(kwargs, match):
    kw = {"dim": DIM, "heads": HEADS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        headwise.create("random_features", **kw)
