"""A training killed or stopped part-way goes on from its last save to the weights of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench import data as data_mod
from bench import train
from bench.errors import Interrupted
from bench.models import CleverhansCNN
from bench.train import ModelCache, TrainConfig, fit
from bench.types import Dataset

# 2 epochs of 12 batches; augmentation draws from the shuffling generator, the hook from torch's global RNG.
CFG = TrainConfig(epochs=2, batch_size=128, lr=0.004, lr_schedule="onecycle", augment=True, train_limit=1500)


class Killed(Exception):
    """Stands for SIGKILL: nothing runs after it, so nothing is saved at that moment."""


def noisy(calls: list[float], kill_at: int | None = None):
    """A batch hook drawing from the global RNG (as BReLU's noise and PGD's random start do); raises Killed on
    call ``kill_at``."""
    def hook(model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        if len(calls) == kill_at:
            raise Killed
        calls.append(progress)
        return (x + 0.1 * torch.randn_like(x)).clamp(0, 1), y
    return hook


def run(x: torch.Tensor, y: torch.Tensor, init_seed: int, **kwargs: Any) -> list[torch.Tensor]:
    torch.manual_seed(init_seed)
    model = CleverhansCNN((1, 28, 28))
    torch.manual_seed(7)
    fit(model, x, y, CFG, seed=0, **kwargs)
    return list(model.state_dict().values())


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_an_interrupted_training_resumes_to_the_uninterrupted_weights(data_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      how: str) -> None:
    mnist = data_mod.load(Dataset.MNIST, data_dir)
    x, y = mnist.train.x, mnist.train.y
    seen: list[float] = []
    reference = run(x, y, 0, batch_hook=noisy(seen))
    assert len(seen) == 24

    checkpoint = tmp_path / "m.partial.pt"
    before: list[float] = []
    if how == "killed":  # saved after every batch; the kill comes in the middle of the second epoch
        monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)
        with pytest.raises(Killed):
            run(x, y, 0, batch_hook=noisy(before, kill_at=17), checkpoint=checkpoint)
    else:  # never due by time: only the stop saves
        polls = iter(range(100))
        with pytest.raises(Interrupted):
            run(x, y, 0, batch_hook=noisy(before), checkpoint=checkpoint, should_stop=lambda: next(polls) == 17)
    assert before == seen[:17] and checkpoint.is_file()

    after: list[float] = []  # another initialisation and another global RNG state: the saved ones must win
    torch.set_rng_state(torch.Generator().manual_seed(99).get_state())
    resumed = run(x, y, 1, batch_hook=noisy(after), checkpoint=checkpoint)
    assert after == seen[17:]
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed, strict=True))
    assert "resuming at batch 17 of 24" in capsys.readouterr().err


def test_a_saved_state_of_another_training_is_not_used(data_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mnist = data_mod.load(Dataset.MNIST, data_dir)
    x, y = mnist.train.x[:300], mnist.train.y[:300]
    checkpoint = tmp_path / "m.partial.pt"
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)
    with pytest.raises(Killed):
        run(x, y, 0, batch_hook=noisy([], kill_at=2), checkpoint=checkpoint)
    saved = checkpoint.read_bytes()
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "optimiser": {"state": {}, "param_groups": []}}, checkpoint)
    with pytest.warns(UserWarning, match="saved training state not used"):  # fails after the weights were loaded
        broken = run(x, y, 0, checkpoint=checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(run(x, y, 0), broken, strict=True))
    checkpoint.write_bytes(saved)
    monkeypatch.setattr(train, "TRAIN_THREADS", 1)  # another thread count: other float sums, other weights
    with pytest.warns(UserWarning, match="saved training state not used .*another training"):
        other = run(x, y, 0, checkpoint=checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(run(x, y, 0), other, strict=True))
    checkpoint.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="saved training state not used"):
        run(x, y, 0, checkpoint=checkpoint)


def test_the_cache_drops_the_saved_state_once_the_model_is_stored_or_forgotten(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    partial = cache.partial("mnist", "none", {"a": 1})
    assert partial.parent == tmp_path / "mnist" and partial.name.endswith(".partial.pt")
    assert partial != cache.partial("mnist", "none", {"a": 2})

    def train_(model: nn.Module) -> dict[str, float]:
        assert partial.is_file()  # a killed earlier attempt left it; the training would resume from it
        return {}
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"state")
    cache.get_or_train("mnist", "none", {"a": 1}, lambda: nn.Linear(2, 2), train_)
    assert not partial.exists()
    partial.write_bytes(b"state")
    cache.remove("mnist", "none", {"a": 1})
    assert not partial.exists() and not list(tmp_path.glob("mnist/*.pt"))


def test_the_dry_run_counts_a_saved_state_only_where_a_training_would_resume_it(data_dir: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    mnist = data_mod.load(Dataset.MNIST, data_dir)
    cache = ModelCache(tmp_path)
    assert cache.progress("mnist", "none", {"a": 1}, "cpu") is None
    checkpoint = cache.partial("mnist", "none", {"a": 1})
    checkpoint.parent.mkdir(parents=True)
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)
    with pytest.raises(Killed):  # 3 batches an epoch, 6 in all; killed after 2
        run(mnist.train.x[:300], mnist.train.y[:300], 0, batch_hook=noisy([], kill_at=2), checkpoint=checkpoint)
    assert cache.progress("mnist", "none", {"a": 1}, "cpu") == pytest.approx(2 / 6)
    assert cache.progress("mnist", "none", {"a": 1}, "cuda") is None
    monkeypatch.setattr(train, "TRAIN_THREADS", 1)
    assert cache.progress("mnist", "none", {"a": 1}, "cpu") is None
