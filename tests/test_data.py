"""Dataset readers on the real files, provenance, and untrusted-file handling."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import data
from bench.errors import DataError
from bench.types import Dataset

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist(data_dir: Path) -> data.Data:
    return data.load(Dataset.MNIST, data_dir, download=False)


def test_mnist_shapes_counts_and_provenance(mnist: data.Data) -> None:
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.test.x.shape == (10000, 1, 28, 28)
    assert mnist.train.x.dtype == torch.float32 and mnist.train.y.dtype == torch.int64
    assert 0.0 <= float(mnist.train.x.min()) and float(mnist.train.x.max()) <= 1.0
    assert torch.bincount(mnist.train.y).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist.test.y).tolist() == MNIST_TEST_COUNTS
    assert abs(float(mnist.train.x.mean()) - 0.1307) < 1e-3
    assert mnist.official and "official" in mnist.provenance


def test_cifar_shapes_labels_and_unofficial_warning(data_dir: Path) -> None:
    with pytest.warns(UserWarning, match="not the official release"):
        cifar = data.load(Dataset.CIFAR10, data_dir, download=False)
    assert cifar.train.x.shape == (50000, 3, 32, 32) and cifar.test.x.shape == (10000, 3, 32, 32)
    assert cifar.train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert cifar.test.y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(cifar.test.y).tolist() == [1000] * 10
    assert not cifar.official and "NOT the official release" in cifar.provenance
    assert set(cifar.mismatched) == set(data.CIFAR_FILES)


def test_strict_data_refuses_unofficial_files(data_dir: Path) -> None:
    with pytest.raises(DataError, match="strict-data"):
        data.load(Dataset.CIFAR10, data_dir, strict=True, download=False)


def test_missing_files_name_the_files_and_variable(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz.*BENCH_DATA_DIR"):
        data.load(Dataset.MNIST, tmp_path, download=False)


def _mnist_copy(data_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "mnist"
    shutil.copytree(data_dir / "mnist", root)
    return root


def test_truncated_gzip_is_an_error_naming_the_file(data_dir: Path, tmp_path: Path) -> None:
    root = _mnist_copy(data_dir, tmp_path)
    target = root / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100_000])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        data.load(Dataset.MNIST, tmp_path, download=False)


def test_wrong_idx_magic_is_an_error(data_dir: Path, tmp_path: Path) -> None:
    root = _mnist_copy(data_dir, tmp_path)
    target = root / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(struct.pack(">I", 0x999) + raw[4:]))
    with pytest.warns(UserWarning), pytest.raises(DataError, match="wrong IDX magic"):
        data.load(Dataset.MNIST, tmp_path, download=False)


def _cifar_dir(tmp_path: Path, test_batch: bytes) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    good = pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}, protocol=2)
    for name in data.CIFAR_FILES:
        (root / name).write_bytes(good)
    (root / "test_batch").write_bytes(test_batch)
    return tmp_path


def test_cifar_batch_with_wrong_shape_is_an_error(tmp_path: Path) -> None:
    bad = pickle.dumps({b"data": np.zeros((3, 1000), np.uint8), b"labels": [0, 1, 2]}, protocol=2)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"test_batch.*\(N, 3072\)"):
        data.load(Dataset.CIFAR10, _cifar_dir(tmp_path, bad), download=False)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_crafted_pickle_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"test_batch.*refused to load global"):
        data.load(Dataset.CIFAR10, _cifar_dir(tmp_path, payload), download=False)
    assert not marker.exists()


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    payload = pickle.dumps({b"data": np.array([object()], dtype=object), b"labels": [0]}, protocol=2)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="object dtype"):
        data.load(Dataset.CIFAR10, _cifar_dir(tmp_path, payload), download=False)


def test_subset_first_and_seeded_sample(mnist: data.Data) -> None:
    index, x, y = data.subset(mnist.test, 100, "first", 0)
    assert index.tolist() == list(range(100)) and torch.equal(y, mnist.test.y[:100])
    a, _, _ = data.subset(mnist.test, 100, "random", 1)
    b, _, _ = data.subset(mnist.test, 100, "random", 1)
    assert torch.equal(a, b) and len(set(a.tolist())) == 100 and not torch.equal(a, index)
