"""Shared fixtures: the real datasets (BENCH_DATA_DIR, default ../shared/data) and small real-data suites."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench import data as data_mod
from bench.models import CleverhansCNN
from bench.train import TrainConfig, fit
from bench.types import Dataset

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BENCH_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()

TINY = """
name = "tiny"
seed = 0
[datasets.mnist]
n = {n}
epochs = 2
train_limit = 6000
[[defenses]]
name = "none"
[[attacks]]
name = "fgsm"
eps = {eps}
threat = ["whitebox", "bpda"]
"""


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "mnist").is_dir():
        pytest.fail(f"the real datasets are not at {DATA}: set BENCH_DATA_DIR (tests never use synthetic data)")
    return DATA


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session (tox points BENCH_CACHE_DIR at one shared by its envs)."""
    configured = os.environ.get("BENCH_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def bench_env(data_dir: Path, cache_dir: Path) -> dict[str, str]:
    """Environment for ``bench`` subprocesses: real data, the session cache, no progress bars."""
    return {**os.environ, "BENCH_DATA_DIR": str(data_dir), "BENCH_CACHE_DIR": str(cache_dir),
            "BENCH_NO_PROGRESS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): small batches
    (HSJA queries one image at a time) gain nothing from two, and on a shared, busy 2-core machine two threads make
    a batch-1 forward pass ~50x slower (measured: 80 ms vs 1.4 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weak_mnist_cnn(data_dir: Path, n: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A CleverhansCNN trained 1 epoch on 5,000 real training images (eval mode, frozen), and the first ``n`` real
    test images with their labels."""
    data = data_mod.load(Dataset.MNIST, data_dir, download=False)
    torch.manual_seed(seed)
    model = CleverhansCNN(Dataset.MNIST.shape)
    fit(model, data.train.x, data.train.y, TrainConfig(epochs=1, train_limit=5000), seed)
    return model.eval().requires_grad_(False), data.test.x[:n], data.test.y[:n]


def tiny_suite(path: Path, n: int = 200, eps: str = "[0.1, 0.3]", extra: str = "") -> Path:
    """A small real-data suite: MNIST, CNN trained 2 epochs on 6,000 images, FGSM white-box and bpda."""
    path.write_text(TINY.format(n=n, eps=eps) + extra)
    return path


def bench(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the ``bench`` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
