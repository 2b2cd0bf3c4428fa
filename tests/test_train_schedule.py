"""Training settings: the one-cycle schedule, label smoothing, the optimizers, and keys that stay what they were."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import data as data_mod
from bench import train
from bench.errors import SuiteError
from bench.grid import expand
from bench.models import CleverhansCNN
from bench.suite import load_suite
from bench.train import TrainConfig, config_dict, fit, loss_fn, make_optimiser
from bench.types import Dataset

# The training settings every model-cache key held before optimizer, weight_decay and label_smoothing existed.
OLD_FIELDS = {"epochs", "batch_size", "lr", "lr_schedule", "loss", "augment", "train_limit"}

SUITE = """
name = "t"
[datasets.mnist]
n = 10
{extra}
[[defenses]]
name = "none"
[[attacks]]
name = "fgsm"
eps = 0.1
"""


@pytest.mark.parametrize("total", [7, 100, 469])
def test_onecycle_is_torchs_one_cycle_lr(total: int) -> None:
    """Factor by factor the default OneCycleLR of torch (cosine both ways, 30 % rise, lr/25 → lr → lr/25e4)."""
    optimiser = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1.0, total_steps=total, cycle_momentum=False)
    expected = []
    for _ in range(total):
        expected.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert [train._lr_factor("onecycle", s, total) for s in range(total)] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_onecycle_shape() -> None:
    total = 1000
    factors = [train._lr_factor("onecycle", s, total) for s in range(total + 1)]
    peak = max(range(total), key=factors.__getitem__)
    assert factors[0] == pytest.approx(1 / 25) and factors[peak] == pytest.approx(1.0)
    assert 0.29 * total <= peak <= 0.3 * total
    assert all(a <= b for a, b in pairwise(factors[:peak + 1]))
    assert all(a >= b for a, b in pairwise(factors[peak:]))
    assert factors[total - 1] == factors[total] == pytest.approx(1 / 25e4)


def test_old_schedules_unchanged() -> None:
    assert train._lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert [train._lr_factor("step", s, 100) for s in (0, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])
    assert train._lr_factor("constant", 99, 100) == 1.0


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_is_torchs(eps: float) -> None:
    logits, y = torch.randn(32, 10, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 10
    assert torch.allclose(loss_fn("ce", logits, y, eps), F.cross_entropy(logits, y, label_smoothing=eps))
    target = F.one_hot(y, 10).float() * (1 - eps) + eps / 10
    assert torch.allclose(loss_fn("mse", logits, y, eps), (logits.softmax(1) - target).pow(2).sum(1).mean())
    if eps == 0.0:
        assert torch.equal(loss_fn("ce", logits, y), F.cross_entropy(logits, y))


def test_config_dict_keeps_the_old_keys() -> None:
    """New settings at their defaults stay out of the model-cache (and cell) keys, so cached models stay valid."""
    assert set(config_dict(TrainConfig())) == OLD_FIELDS
    assert config_dict(TrainConfig(epochs=30, augment=True)) == {
        "epochs": 30, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine", "loss": "ce", "augment": True,
        "train_limit": 0}
    changed = config_dict(TrainConfig(optimizer="sgd", weight_decay=5e-4, label_smoothing=0.1))
    assert changed.keys() - OLD_FIELDS == {"optimizer", "weight_decay", "label_smoothing"}
    assert config_dict(TrainConfig(label_smoothing=0.1)).keys() - OLD_FIELDS == {"label_smoothing"}


def test_suite_settings_reach_the_config_and_the_cell_key(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SUITE.format(extra=""))
    plain = expand(load_suite(path))[0]
    assert set(plain.spec()["train"]) == OLD_FIELDS
    path.write_text(SUITE.format(extra='lr_schedule = "onecycle"\noptimizer = "sgd"\nweight_decay = 5e-4\n'
                                       'label_smoothing = 0.1\nlr = 0.05'))
    cell = expand(load_suite(path))[0]
    assert cell.train == TrainConfig(lr=0.05, lr_schedule="onecycle", optimizer="sgd", weight_decay=5e-4,
                                     label_smoothing=0.1)
    assert cell.key != plain.key


@pytest.mark.parametrize(("extra", "path"), [('optimizer = "rmsprop"', "optimizer"),
                                             ("label_smoothing = 1.0", "label_smoothing"),
                                             ("weight_decay = -0.1", "weight_decay"),
                                             ('lr_schedule = "cyclic"', "lr_schedule")])
def test_bad_training_settings_are_refused(tmp_path: Path, extra: str, path: str) -> None:
    file = tmp_path / "s.toml"
    file.write_text(SUITE.format(extra=extra))
    with pytest.raises(SuiteError, match=f"datasets.mnist.{path}"):
        load_suite(file)


def test_optimisers() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    adam = make_optimiser(TrainConfig(), params)
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 0.0 and adam.defaults["lr"] == 1e-3
    sgd = make_optimiser(TrainConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4), params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert sgd.defaults["weight_decay"] == 5e-4
    assert type(make_optimiser(TrainConfig(optimizer="adamw", weight_decay=0.05), params)) is torch.optim.AdamW


def test_fit_with_the_new_settings_learns(data_dir: Path) -> None:
    """A few hundred steps on real MNIST: SGD + one-cycle + label smoothing + weight decay trains, seeded."""
    mnist = data_mod.load(Dataset.MNIST, data_dir)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, lr_schedule="onecycle", optimizer="sgd", weight_decay=5e-4,
                      label_smoothing=0.1, train_limit=4000)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = CleverhansCNN((1, 28, 28))
        fit(model, mnist.train.x, mnist.train.y, cfg, seed=0)
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(),
                                                 strict=True))
    with torch.no_grad():
        accuracy = (models[0](mnist.test.x[:500]).argmax(1) == mnist.test.y[:500]).float().mean()
    assert accuracy > 0.8


@pytest.mark.parametrize("bars", ["on", "off"])
def test_batch_hooks_see_the_training_progress_with_or_without_bars(monkeypatch: pytest.MonkeyPatch,
                                                                    bars: str) -> None:
    """Adversarial training ramps eps up by this progress: it once came from the progress bar, which stays at 0
    when bars are off, so advtrain trained on clean images under --no-progress."""
    if bars == "off":
        monkeypatch.setenv("BENCH_NO_PROGRESS", "1")
    else:
        monkeypatch.delenv("BENCH_NO_PROGRESS", raising=False)
    seen: list[float] = []

    def hook(model: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(progress)
        return x, y

    x, y = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    fit(CleverhansCNN((1, 28, 28)), x, y, TrainConfig(epochs=2, batch_size=10), seed=0, batch_hook=hook)
    assert seen == [step / 8 for step in range(8)]


def test_the_weights_do_not_depend_on_the_threads_of_the_process(data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread count sets the order of float sums: a model lost from the cache must retrain to the weights its
    stored cells were computed on whatever the process runs on (taskset, another core count), so fit trains on
    TRAIN_THREADS; with the process's own count, 1 and 2 threads give different weights."""
    mnist = data_mod.load(Dataset.MNIST, data_dir)
    cfg = TrainConfig(epochs=1, lr=0.004, lr_schedule="onecycle", train_limit=1500)
    before = torch.get_num_threads()

    def weights(threads: int) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = CleverhansCNN((1, 28, 28))
        fit(model, mnist.train.x, mnist.train.y, cfg, seed=0)
        assert torch.get_num_threads() == threads  # restored
        return list(model.state_dict().values())

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))

    try:
        assert same(weights(1), weights(2))
        monkeypatch.setattr(train, "TRAIN_THREADS", 1)
        one = weights(2)
        monkeypatch.setattr(train, "TRAIN_THREADS", 2)
        assert not same(one, weights(2))
    finally:
        torch.set_num_threads(before)


def test_flip_crop_is_a_flip_then_a_window_of_the_padded_image(data_dir: Path) -> None:
    """Against a per-image reference on real CIFAR-10 images, with the same draws: each output is the image, mirrored
    where the draw says, zero-padded by 4 and cut at the drawn offset; the draws flip about half the images."""
    x = data_mod.load(Dataset.CIFAR10, data_dir, download=False).test.x[:256]
    out = train.flip_crop(x, torch.Generator().manual_seed(3))
    draws = torch.Generator().manual_seed(3)
    flip = torch.rand(len(x), generator=draws) < 0.5
    dy = torch.randint(0, 9, (len(x),), generator=draws)
    dx = torch.randint(0, 9, (len(x),), generator=draws)
    for i in range(len(x)):
        image = x[i].flip(2) if flip[i] else x[i]
        window = F.pad(image, (4, 4, 4, 4))[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], window)
    assert 0.4 < flip.float().mean() < 0.6 and len(set(dy.tolist())) == 9
