"""Fashion-MNIST read offline from Debian's ``dataset-fashion-mnist`` package (IDX files, gzip or plain).

Xiao, Rasul, Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning Algorithms"
(2017): 60 000 training and 10 000 test grey images of 28 x 28 pixels in 10 classes (``FASHION_MNIST_CLASSES``).
The package installs ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under
``/usr/share/datasets/fashion-mnist``; ``root=`` points elsewhere. Nothing is downloaded.

>>> images, labels = fashion_mnist("test")   # [10000, 1, 28, 28] float32 in [0, 1], [10000] int64
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["fashion_mnist", "read_idx", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where dataset-fashion-mnist installs the files
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (``.gz`` decompressed on the fly) as a numpy array; only the unsigned-byte type is used here."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX data (type 0x08) is supported, got type {raw[2]:#04x}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape=} but holds {data.size} bytes")
    return data.reshape(shape)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] not found in {root}. Install the offline copy with "
        f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make setup` does it), or pass root= "
        f"to a folder holding the four IDX files.")


def fashion_mnist(split: str = "train", *, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``split`` in {"train", "test"} -> ``(images [N, 1, 28, 28] float32 in [0, 1], labels [N] int64)``."""
    if split not in _PREFIX:
        raise ValueError(f"split must be one of {sorted(_PREFIX)}, got {split=}")
    root = FASHION_MNIST_DIR if root is None else Path(root)
    prefix = _PREFIX[split]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))  # (N, 28, 28) uint8
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))  # (N,) uint8
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} do not match labels {labels.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 28, 28)
    return x, torch.from_numpy(labels.astype(np.int64))
