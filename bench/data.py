"""Dataset readers for the original release files: MNIST IDX ``.gz`` and CIFAR-10 Python batches.

Images come back as float32 NCHW tensors in [0, 1], labels as int64. Every file is checked against the official
release's md5: a mismatch is used with a warning (or refused with ``strict``) and recorded as provenance, a
truncated or malformed file is a :class:`DataError` naming it. CIFAR-10 pickles are untrusted input and are read
with an unpickler that can build nothing but numpy arrays, lists, dicts, strings and numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.errors import DataError
from bench.types import Dataset

DEFAULT_DIR = Path("~/.cache/qusec-bench/data")

MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")

CIFAR_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_TAR_MD5 = "c58f30108f718f92721af3b95e74349a"

SUBDIR = {Dataset.MNIST: "mnist", Dataset.CIFAR10: "cifar-10-batches-py"}
FILES = {Dataset.MNIST: MNIST_FILES, Dataset.CIFAR10: CIFAR_FILES}


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Data:
    """A loaded dataset with its provenance: ``official`` is False when any file differs from the release."""

    dataset: Dataset
    train: Split
    test: Split
    md5: dict[str, str]
    mismatched: tuple[str, ...] = field(default=())

    @property
    def official(self) -> bool:
        return not self.mismatched

    @property
    def provenance(self) -> str:
        if self.official:
            return "official release (md5 verified)"
        return "NOT the official release: md5 differs for " + ", ".join(self.mismatched)


def resolve_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``--data-dir``, else ``$BENCH_DATA_DIR``, else ``~/.cache/qusec-bench/data``."""
    chosen = data_dir or os.environ.get("BENCH_DATA_DIR") or DEFAULT_DIR
    return Path(chosen).expanduser().resolve()


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(dataset: Dataset, data_dir: str | os.PathLike[str] | None = None, *, strict: bool = False,
         download: bool = True) -> Data:
    """Read ``dataset`` from ``data_dir`` (see :func:`resolve_dir`), downloading missing files when possible."""
    root = resolve_dir(data_dir) / SUBDIR[dataset]
    expected = FILES[dataset]
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        if download:
            _download(dataset, root, missing)
        missing = [name for name in expected if not (root / name).is_file()]
        if missing:
            raise DataError(
                f"{dataset.value} files missing in {root}: {', '.join(missing)}; download failed or is off. "
                f"Put the original files there or point BENCH_DATA_DIR (or --data-dir) at a folder holding "
                f"{SUBDIR[dataset]}/"
            )
    md5 = {name: _md5_of(root / name) for name in expected}
    mismatched = tuple(name for name in expected if md5[name] != expected[name])
    if mismatched:
        message = (f"{dataset.value} data in {root} is not the official release (md5 differs for "
                   f"{', '.join(mismatched)}); results are marked as such")
        if strict:
            raise DataError(message + "; refused because of --strict-data")
        warnings.warn(message, stacklevel=2)
    if dataset is Dataset.MNIST:
        train = Split(_idx_images(root / "train-images-idx3-ubyte.gz"), _idx_labels(root / "train-labels-idx1-ubyte.gz"))
        test = Split(_idx_images(root / "t10k-images-idx3-ubyte.gz"), _idx_labels(root / "t10k-labels-idx1-ubyte.gz"))
        _check_pair(root / "train-images-idx3-ubyte.gz", train, dataset)
        _check_pair(root / "t10k-images-idx3-ubyte.gz", test, dataset)
    else:
        batches = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
        train = Split(_to_float(np.concatenate([pixels for pixels, _ in batches])),
                      torch.cat([labels for _, labels in batches]))
        pixels, labels = _cifar_batch(root / "test_batch")
        test = Split(_to_float(pixels), labels)
    return Data(dataset, train, test, md5, mismatched)


def _md5_of(path: Path) -> str:
    try:
        return md5sum(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _check_pair(path: Path, split: Split, dataset: Dataset) -> None:
    """As many labels as images, and images of the dataset's size (the model is built for it)."""
    if tuple(split.x.shape[1:]) != dataset.shape:
        size = "×".join(map(str, split.x.shape[1:]))
        expected = "×".join(map(str, dataset.shape))
        raise DataError(f"{path}: images of {size} pixels, expected {expected} ({dataset.value})")
    if len(split.x) != len(split.y):
        raise DataError(f"{path}: {len(split.x)} images but {len(split.y)} labels in the matching label file")


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None


def _idx_header(path: Path, raw: bytes, magic: int, ndim: int) -> tuple[int, ...]:
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: too short for an IDX header")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise DataError(f"{path}: wrong IDX magic number 0x{found:08x} (expected 0x{magic:08x})")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
        raise DataError(f"{path}: size does not match its IDX header {dims} (truncated or padded)")
    return dims


def _idx_images(path: Path) -> torch.Tensor:
    raw = _read_gz(path)
    n, h, w = _idx_header(path, raw, 0x803, 3)
    return _to_float(np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, 1, h, w))


def _to_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 pixels → float32 in [0, 1], converted in place of one float copy (CIFAR-10's train set is 614 MB)."""
    return torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy()).to(torch.float32).div_(255.0)


def _idx_labels(path: Path) -> torch.Tensor:
    raw = _read_gz(path)
    _idx_header(path, raw, 0x801, 1)
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    if labels.size and labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} outside 0..9")
    return torch.from_numpy(labels)


class _SafeUnpickler(pickle.Unpickler):
    """Builds numpy arrays and plain containers only; any other global (``os.system`` ...) is refused.
    ``_codecs.encode`` is how protocol-2 pickles written by Python 3 store bytes."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}")
        if name == "dtype":
            return _plain_dtype
        return super().find_class(module, name)


def _plain_dtype(spec: object, *args: object) -> np.dtype:
    dtype = np.dtype(spec, *args)  # type: ignore[call-overload]
    if dtype.hasobject:
        raise pickle.UnpicklingError("refused object dtype")
    return dtype


def _cifar_batch(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 pixels N×3×32×32, int64 labels) of one batch file, validated."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        batch = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            struct.error) as exc:
        raise DataError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, found {type(batch).__name__}")
    data, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {shape}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
            isinstance(v, int) and 0 <= v <= 9 for v in labels):
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), torch.tensor(labels, dtype=torch.int64)


def _download(dataset: Dataset, root: Path, missing: list[str]) -> None:
    """Fetch missing files from the usual mirrors, checking md5; quietly gives up without network."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        if dataset is Dataset.MNIST:
            for name in missing:
                _fetch_checked((m + name for m in MNIST_MIRRORS), root / name, MNIST_FILES[name])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                archive = Path(tmp) / "cifar-10-python.tar.gz"
                _fetch_checked([CIFAR_URL], archive, CIFAR_TAR_MD5)
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
                for name in missing:
                    shutil.move(Path(tmp) / "cifar-10-batches-py" / name, root / name)
    except OSError as exc:
        warnings.warn(f"could not download {dataset.value} ({exc})", stacklevel=3)


def _fetch_checked(urls: object, target: Path, md5: str) -> None:
    errors = []
    for url in urls:  # type: ignore[attr-defined]
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(target.with_suffix(".part"), "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        if md5sum(target.with_suffix(".part")) == md5:
            target.with_suffix(".part").replace(target)
            return
        errors.append(f"{url}: md5 mismatch")
    raise OSError("; ".join(errors))


def subset(split: Split, n: int, sample: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The evaluated test images: the first ``n`` or a seeded sample; returns (indices, x, y)."""
    if n > len(split):
        raise DataError(f"n = {n} but the test set has only {len(split)} images")
    if sample == "first":
        index = torch.arange(n)
    else:
        index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return index, split.x[index], split.y[index]
