"""Fashion-MNIST IDX loader (skips when the Debian package is absent) and the IDX reader on synthetic files."""

import gzip

import numpy as np
import pytest
import torch

from headwise.arena.data import FASHION_MNIST_DIR, fashion_mnist, read_idx

installed = (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file() or \
    (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte").is_file()


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_reads_synthetic_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (3, 28, 28)), np.array([0, 9, 4])
    suffix = ".gz" if compress else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = fashion_mnist("test", root=tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images / 255.0).float())
    assert y.tolist() == [0, 9, 4]


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)


def test_bad_split_and_bad_file(tmp_path):
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("val")
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(not installed, reason=f"dataset-fashion-mnist not installed ({FASHION_MNIST_DIR})")
def test_real_test_split():
    x, y = fashion_mnist("test")
    assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
    assert 0.0 <= x.min() and x.max() == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10  # the test split is balanced
