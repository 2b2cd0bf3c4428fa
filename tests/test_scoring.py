"""Scoring as AutoAttack does it, on real MNIST: robust ⊆ clean, the harness projects every example itself, the
step savings never make a defense look stronger, the oblivious threat, and the probe-based red flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torchattacks
from torch import nn

from bench import flags
from bench.attacks import REGISTRY as ATTACKS
from bench.attacks._steps import iterate
from bench.attacks.base import Attack, Runtime
from bench.evaluate import Context, run_cell
from bench.grid import expand
from bench.models import CleverhansCNN, predict
from bench.probe import probe
from bench.results import unpack_mask
from bench.runner import run
from bench.settings import Settings
from bench.suite import load_suite
from conftest import tiny_suite

GRID = """
[[defenses]]
name = "squeeze"
[[attacks]]
name = "pgd"
eps = [0.1, 0.2]
steps = 10
threat = ["whitebox", "bpda", "oblivious"]
[[attacks]]
name = "bim"
eps = 0.2
steps = 10
target = "random"
"""


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path) -> dict[bool, list[dict[str, Any]]]:
    """The same real-data grid with the step savings on and off (same seeds), on a weak CNN (about 90 % clean, so
    some images are misclassified clean)."""
    tmp = tmp_path_factory.mktemp("scoring")
    suite = load_suite(tiny_suite(tmp / "s.toml", n=200, extra=GRID))
    out = {}
    for save in (True, False):
        settings = Settings(data_dir=str(data_dir), cache_dir=str(cache_dir), save_steps=save)
        assert run(suite, tmp / f"out-{save}", settings, progress=False).exit_code == 0
        out[save] = lines(tmp / f"out-{save}")
    return out


def test_every_record_is_robust_within_clean(runs: dict[bool, list[dict[str, Any]]]) -> None:
    for record in runs[True] + runs[False]:
        n = record["n"]
        robust, clean = unpack_mask(record["robust_mask"], n), unpack_mask(record["clean_mask"], n)
        assert not (robust & ~clean).any() and record["robust_acc"] <= record["clean_acc"]
    assert any(r["clean_acc"] < 1 for r in runs[True])  # the invariant was tested on misclassified images


def test_savings_never_raise_robust_accuracy_and_save_steps(runs: dict[bool, list[dict[str, Any]]]) -> None:
    off = {r["cell_id"]: r for r in runs[False]}
    for on in runs[True]:
        assert on["robust_acc"] <= off[on["cell_id"]]["robust_acc"] + 0.005, on["attack"]
    # oblivious cells never stop early; benchmarks/step_savings.py measures the savings on the quick suite
    assert sum(r["gradients"] for r in runs[True]) < 0.85 * sum(r["gradients"] for r in runs[False])
    for squeezed in (r for r in runs[True] if r["defense"] == "squeeze(bits=1)" and r["threat"] == "whitebox"):
        # 1-bit squeezing rounds: its input gradient is exactly zero, so each standing image ends after one step
        assert squeezed["grad_zero"] == 1.0 and squeezed["gradients"] == round(squeezed["clean_acc"] * 200)


def test_clean_misclassified_images_are_not_attacked(runs: dict[bool, list[dict[str, Any]]]) -> None:
    fgsm = next(r for r in runs[True] if r["attack_name"] == "fgsm" and r["threat"] == "whitebox")
    assert fgsm["gradients"] == round(fgsm["clean_acc"] * fgsm["n"])


def test_oblivious_crafts_once_on_the_undefended_model(runs: dict[bool, list[dict[str, Any]]]) -> None:
    oblivious = [r for r in runs[True] if r["threat"] == "oblivious" and r["attack_name"] == "pgd"]
    assert {r["defense"] for r in oblivious} == {"none", "squeeze(bits=1)"}
    assert all(r["shared_crafting"] and not r["early_stop"] and r["threat_label"] == "obl" for r in oblivious)
    for eps in (0.1, 0.2):
        same = [r for r in oblivious if r["eps"] == eps]
        assert len({(r["gradients"], r["queries"]) for r in same}) == 1  # one crafting run for both defenses
        assert same[0]["gradients"] == 200 * 10  # every image, every step: nothing known on the defended model


class _OutOfBall(Attack):
    """Test attack returning examples far outside the eps ball and [0, 1]."""

    name = "outofball"

    def perturb(self, model, x, y, eps, target):  # type: ignore[no-untyped-def]
        return x + 3 * torch.randn_like(x)


@pytest.fixture
def out_of_ball() -> Any:
    ATTACKS._load()
    ATTACKS.register(_OutOfBall)
    yield
    ATTACKS._items.pop(_OutOfBall.name)


def test_run_cell_projects_what_the_attack_returns(tmp_path: Path, data_dir: Path, cache_dir: Path,
                                                   out_of_ball: None) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=100, extra='[[attacks]]\nname = "outofball"\neps = 0.05\n'))
    cell = next(c for c in expand(suite) if c.attack == "outofball")
    record = run_cell(cell, Context(Settings(data_dir=str(data_dir), cache_dir=str(cache_dir))))
    assert record["success_rate"] > 0 and record["linf"] == pytest.approx(0.05, abs=1e-6)


class _Linear(nn.Module):
    """Logits (s·mean(x), 0): class 0 wins for any input in [0, 1] when s is large; the loss of class 0 rises
    steadily under PGD but never flips the prediction."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.scale * x.flatten(1).mean(1) + 5
        return torch.stack([score, torch.zeros_like(score)], 1)


def test_step_loop_keeps_the_first_adversarial_iterate_and_restarts_only_survivors() -> None:
    torch.manual_seed(0)
    model = CleverhansCNN((1, 28, 28)).eval().requires_grad_(False)
    x = torch.rand(12, 1, 28, 28)
    y = model(x).argmax(1)  # every image correct, so each is attacked
    steps: list[int] = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            steps.append(len(batch))
            return self.inner(batch)

    adv, _ = iterate(Counting(), x, y, None, eps=0.3, alpha=0.05, steps=20, random_start=True, restarts=3,
                     runtime=Runtime(batch=4))
    fooled = model(adv).argmax(1) != y
    assert fooled.any() and all(s <= 4 for s in steps)
    # an image leaves at its first misclassified iterate: the total forward work is far below 12 × 3 × 21
    assert sum(steps) < 12 * 21
    sure = _Linear(1.0)
    ones = torch.ones(3, 1, 4, 4) * 0.5
    calls: list[int] = []
    counted = nn.Sequential(sure)
    counted.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    _, stats = iterate(counted, ones, torch.zeros(3, dtype=torch.long), None, eps=0.1, alpha=0.01, steps=10,
                       random_start=False, restarts=2, runtime=Runtime(batch=8))
    assert sum(calls) == 3 * 11 * 2  # never fooled: every restart runs every step (and the final check)
    assert stats["late_loss_gain"] == pytest.approx(0.1, abs=0.02)  # a steady climb: 10 % in the last 10 %


@pytest.mark.parametrize(("decay", "path"), [(False, 0.1), (True, 0.055)])
def test_step_loop_linear_schedule_shrinks_each_step(decay: bool, path: float) -> None:
    """Every pixel's gradient sign is the same at every step, so the image moves by the sum of the steps:
    10 × 0.01 constant, or 0.01 · (1 − t/10) summed over t = 0..9 with the linear schedule."""
    half = torch.full((2, 1, 4, 4), 0.5)
    adv, _ = iterate(_Linear(1.0), half, torch.zeros(2, dtype=torch.long), None, eps=0.5, alpha=0.01, steps=10,
                     random_start=False, restarts=1, runtime=Runtime(batch=8), decay=decay)
    assert torch.allclose(adv, half - path, atol=1e-6)


def test_step_loop_ends_an_image_whose_gradient_is_exactly_zero_with_the_same_result() -> None:
    """A rounding defense has a zero input gradient: the sign step cannot move the image, so stopping it at once
    must give exactly what taking every step gives, for far fewer steps (restarts still run)."""
    torch.manual_seed(0)
    cnn = CleverhansCNN((1, 28, 28)).eval().requires_grad_(False)
    x = torch.rand(12, 1, 28, 28)
    y = cnn(torch.round(x)).argmax(1)
    calls: list[int] = []

    class Rounded(nn.Module):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            calls.append(len(batch))
            return cnn(torch.round(batch))

    runs = {}
    for early_stop in (False, True):
        calls.clear()
        torch.manual_seed(1)
        adv, stats = iterate(Rounded(), x, y, None, eps=0.3, alpha=0.05, steps=20, random_start=True, restarts=3,
                             runtime=Runtime(batch=5, early_stop=early_stop))
        runs[early_stop] = adv, stats, sum(calls)
    (adv_off, stats_off, work_off), (adv_on, stats_on, work_on) = runs[False], runs[True]
    assert torch.equal(adv_on, adv_off) and stats_on == stats_off
    assert work_on * 21 == work_off  # the same runs (images and restarts), one forward each instead of 21


def test_probe_and_flags_fire_on_models_built_to_trigger_them() -> None:
    torch.manual_seed(0)
    cnn = CleverhansCNN((1, 28, 28)).eval().requires_grad_(False)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))

    class Rounded(nn.Module):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return cnn(torch.round(batch))

    class Noisy(nn.Module):
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return cnn(batch + 0.01 * torch.randn_like(batch))

    rounded, noisy = Rounded(), Noisy()
    for module in (rounded, noisy):
        module.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)
    assert probe(cnn, x, y) == {"grad_zero": 0.0, "randomized": False}
    assert probe(rounded, x, y)["grad_zero"] == 1.0 and probe(noisy, x, y)["randomized"] is True

    def record(**extra: Any) -> dict[str, Any]:
        return {"dataset": "mnist", "defense": "d", "attack": "pgd", "attack_name": "pgd", "threat": "whitebox",
                "threat_label": "wb", "eps": 0.3, "robust_acc": 0.5, "error": None, "purpose": "grid",
                "targeted": False, "norm": "linf", "gradient_free": False, "iterative": True,
                "grad_zero": 0.0, "randomized": False, "late_loss_gain": 0.001, **extra}

    codes = {f.code for f in flags.compute([record()])}
    assert not codes & {"no-grad", "random", "unstable-loss"}
    assert {f.code for f in flags.compute([record(grad_zero=1.0)])} >= {"no-grad"}
    assert {f.code for f in flags.compute([record(randomized=True)])} >= {"random"}
    assert {f.code for f in flags.compute([record(late_loss_gain=0.1)])} >= {"unstable-loss"}


def test_autoattack_ensemble_agrees_with_torchattacks(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    """The harness composes AutoAttack itself (each component on what still stands, scored on the defended model):
    it must agree with torchattacks' own AutoAttack on the same model and images."""
    extra = '[[attacks]]\nname = "autoattack"\neps = [0.2, 0.3]\n'
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=500, extra=extra))
    ctx = Context(Settings(data_dir=str(data_dir), cache_dir=str(cache_dir)))
    cells = {c.eps: c for c in expand(suite) if c.attack == "autoattack"}
    record = run_cell(cells[0.2], ctx)
    stages = record["components"]
    assert [c["attack"] for c in stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    accuracies = [c["robust_acc"] for c in stages]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] == record["robust_acc"]
    model = ctx.models.model(cells[0.2])
    _, x, y = ctx.models.eval_set(cells[0.2])
    clean = unpack_mask(record["clean_mask"], 500)
    reference = torchattacks.AutoAttack(model, norm="Linf", eps=0.2, version="standard", n_classes=10, seed=0)
    adv = reference(x[clean], y[clean])
    theirs = (predict(model, adv) == y[clean]).sum() / 500
    assert abs(record["robust_acc"] - float(theirs)) <= 0.005
    assert run_cell(cells[0.3], ctx)["robust_acc"] <= 0.01
