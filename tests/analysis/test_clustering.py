"""Head pattern clustering: PCA + k-means recovers planted families of attention maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headwise.analysis.clustering import cluster_heads, kmeans


def planted_maps(n_per: int = 5, N: int = 20, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Three families of [N, N] maps (diagonal, first column, uniform causal) with noise, shuffled."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(N)
    first = torch.zeros(N, N)
    first[:, 0] = 1
    causal = torch.tril(torch.ones(N, N)) / torch.arange(1, N + 1)[:, None]
    maps, labels = [], []
    for label, base in enumerate((eye, first, causal)):
        for _ in range(n_per):
            m = (base + 0.05 * torch.rand(N, N, generator=g)).clamp_min(0)
            maps.append(m / m.sum(-1, keepdim=True))
            labels.append(label)
    order = torch.randperm(len(maps), generator=g)
    return torch.stack(maps)[order], np.array(labels)[order.numpy()]


def test_planted_families_are_recovered():
    maps, truth = planted_maps()
    hc = cluster_heads(maps, k=3)
    assert hc.thumbnails.shape == (15, 16, 16) and hc.coords.shape[0] == 15
    # same partition up to renaming: each found cluster is one planted family
    for c in range(3):
        assert len(set(truth[hc.labels == c])) == 1
    assert len(set(hc.labels)) == 3
    assert sorted(truth[hc.representatives]) == [0, 1, 2]
    assert 0.5 < hc.explained[:2].sum() <= 1 + 1e-12


def test_k_is_clipped_and_results_are_deterministic():
    maps, _ = planted_maps(n_per=1)
    a, b = cluster_heads(maps, k=10), cluster_heads(maps, k=10)
    assert np.array_equal(a.labels, b.labels) and sorted(a.labels) == [0, 1, 2]


def test_kmeans_on_points():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    labels, centers = kmeans(x, 2, seed=3)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert np.allclose(sorted(centers[:, 0]), [0.05, 5.05])
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 5)


@pytest.mark.parametrize("maps", [torch.zeros(4, 4), torch.zeros(0, 3, 3)], ids=["2-D", "empty"])
def test_bad_input(maps):
    with pytest.raises(ValueError, match="maps"):
        cluster_heads(maps)
