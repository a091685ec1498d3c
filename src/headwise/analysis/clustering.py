"""Pattern summary: cluster heads by their attention maps (PCA + k-means) and pick a representative per cluster.

The visual-analytics paper ("How Does Attention Work in Vision Transformers? A Visual Analytics Attempt")
summarises head patterns with an autoencoder; we use the lighter PCA + k-means the issue allows: each head's map
(averaged over the batch) is resized to ``size x size`` by area averaging, flattened, centred, projected on its top
``components`` principal directions (SVD), and clustered by k-means (Lloyd's algorithm, k-means++ seeding, a fixed
seed). The representative of a cluster is its member nearest the centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["HeadClusters", "cluster_heads", "kmeans"]


@dataclass
class HeadClusters:
    labels: np.ndarray  # [K] cluster of each map
    representatives: list[int]  # per cluster, the index of its member nearest the centroid
    coords: np.ndarray  # [K, c] PCA coordinates of each map
    explained: np.ndarray  # [c] fraction of variance of each principal component
    thumbnails: np.ndarray  # [K, size, size] the resized maps that were clustered


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on rows of ``x`` ``[K, c]`` with k-means++ seeding: ``(labels [K], centroids [k, c])``."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in [1, {len(x)}] (the number of points), got {k=}")
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
    c = np.asarray(centers, dtype=np.float64)
    labels = np.zeros(len(x), dtype=np.int64)
    for it in range(iters):
        new = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        if it and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                c[j] = x[labels == j].mean(0)
    return labels, c


def cluster_heads(maps: Tensor, k: int = 4, *, size: int = 16, components: int = 8, seed: int = 0) -> HeadClusters:
    """Cluster ``K`` attention maps ``[K, n, M]`` (one per head, e.g. averaged over the batch) into ``k`` groups.

    ``k`` and ``components`` are clipped to the number of maps. Returns :class:`HeadClusters`.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 3 or maps.shape[0] < 1:
        raise ValueError(f"maps must be [K, n, M] with K >= 1, got {getattr(maps, 'shape', type(maps).__name__)}")
    if size < 1 or k < 1 or components < 1:
        raise ValueError(f"size, k and components must be positive, got {size=} {k=} {components=}")
    thumbs = torch.nn.functional.adaptive_avg_pool2d(maps.double()[:, None], size)[:, 0]  # (K, size, size)
    x = thumbs.flatten(1).numpy()
    x = x - x.mean(0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    c = min(components, len(s))
    coords = u[:, :c] * s[:c]  # (K, c)
    var = s**2
    explained = var[:c] / var.sum() if var.sum() > 0 else np.zeros(c)
    k = min(k, len(x))
    labels, centroids = kmeans(coords, k, seed=seed)
    reps = []
    for j in range(k):
        members = np.nonzero(labels == j)[0]
        if len(members):
            reps.append(int(members[((coords[members] - centroids[j]) ** 2).sum(-1).argmin()]))
    return HeadClusters(labels, reps, coords, explained, thumbs.numpy())
