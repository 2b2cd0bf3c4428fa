"""Shared work is done once and the fast paths count right (calls and passes are counted, never timed)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_suite

from bench import evaluate, perf
from bench.attacks import _art
from bench.cli import main
from bench.craft import CPU_MAX_BATCH, CountingModel, attack_batch
from bench.evaluate import Context, craft_cell
from bench.executors import LocalExecutor
from bench.grid import expand
from bench.models import CleverhansCNN
from bench.runner import run
from bench.settings import Settings
from bench.suite import load_suite
from bench.types import Dataset

# Three defenses on the same weights (none, and squeeze at 1 and 4 bits) sharing one substitute.
SHARED = """
[[defenses]]
name = "squeeze"
bits = [1, 4]
[[attacks]]
name = "fgsm"
eps = [0.1, 0.3]
threat = "blackbox"
[blackbox]
oracle = "undefended"
holdout = 20
rounds = 1
epochs = 1
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path) -> Any:
    """The run of SHARED, counting the attack runs per (attacked model's type, images): the grid's cells attack
    their clean-correct images, transfer threats every image once per (attack, eps)."""
    tmp = tmp_path_factory.mktemp("shared")
    suite = load_suite(tiny_suite(tmp / "s.toml", n=64, extra=SHARED))
    ctx = Context(Settings(data_dir=str(data_dir), cache_dir=str(cache_dir), reuse_crafted=False))  # counted here
    blackbox = next(c for c in expand(suite) if c.threat == "blackbox")
    ctx.models.cache.remove(blackbox.dataset.value, *ctx.models.artifact("substitute", blackbox))
    crafts: list[str] = []
    real = evaluate.craft

    def counting(attack: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        crafts.append(type(model).__name__)
        return real(attack, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "craft", counting)
        summary = run(suite, tmp / "out", ctx.settings, executor=LocalExecutor(ctx), progress=False)
    records = [json.loads(line) for line in (tmp / "out" / "cells.jsonl").read_text().splitlines()]
    return ctx, summary, records, crafts


def test_defenses_share_one_substitute_and_one_transfer_per_attack_and_eps(shared_run: Any) -> None:
    ctx, summary, records, crafts = shared_run
    assert summary.exit_code == 0
    assert ctx.models.calls["substitute_trainings"] == 1 and ctx.models.calls["substitute"] == 1
    assert crafts.count("SubstituteCNN") == 2  # fgsm at eps 0.1 and 0.3, for all three defenses
    blackbox = [r for r in records if r["threat"] == "blackbox"]
    assert len(blackbox) == 6 and len({r["cell_id"] for r in blackbox}) == 6
    for eps in (0.1, 0.3):
        cells = [r for r in blackbox if r["eps"] == eps]
        assert {r["defense"] for r in cells} == {"none", "squeeze(bits=1)", "squeeze(bits=4)"}
        assert len({(r["queries"], r["gradients"]) for r in cells}) == 1  # the one transfer's counts
        assert all(r["gradients"] == 64 and r["error"] is None and r["shared_crafting"] for r in cells)


def test_clean_predictions_once_per_defense(shared_run: Any) -> None:
    ctx, _, records, _ = shared_run
    assert len(records) == 3 * 6  # per defense: whitebox and bpda at 2 eps, blackbox at 2 eps
    calls = ctx.models.calls
    assert calls["clean"] == 3 and calls["model"] == 3 and calls["data"] == 1
    assert calls["trainings"] <= 1  # the three share the undefended weights (1: the cache did not have them)


def test_bpda_of_none_is_the_whitebox_computation(shared_run: Any) -> None:
    _, _, records, crafts = shared_run
    # whitebox: 3 defenses × 2 eps; bpda: only the two squeeze defenses have something to approximate (2 × 2 eps)
    assert crafts.count("DefendedModel") == 6 + 4
    for eps in (0.1, 0.3):
        white, bpda = (next(r for r in records if r["defense"] == "none" and r["threat"] == t and r["eps"] == eps)
                       for t in ("whitebox", "bpda"))
        assert bpda["same_as"] == white["cell_id"] and bpda["robust_acc"] == white["robust_acc"]


def test_batch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    for dataset in Dataset:
        batch = attack_batch(dataset, "cpu")
        assert batch == attack_batch(dataset, "cpu") and batch & (batch - 1) == 0 and 32 <= batch <= CPU_MAX_BATCH
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (512 << 20) // 4096}  # a 512 MiB machine
    monkeypatch.setattr("os.sysconf", lambda name: pages[name])
    assert attack_batch(Dataset.MNIST, "cpu") == 64 and attack_batch(Dataset.CIFAR10, "cpu") == 32

    class Props:
        total_memory = 80 << 30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert attack_batch(Dataset.MNIST, "cuda") == 8192 and attack_batch(Dataset.CIFAR10, "cuda") == 4096


@pytest.mark.parametrize(("attack", "n", "batches"), [("pgd", 64, (16, 64)), ("jsma", 12, (4, 12))])
def test_batch_size_does_not_change_results(tmp_path: Path, data_dir: Path, cache_dir: Path, attack: str, n: int,
                                            batches: tuple[int, int]) -> None:
    extra = f'[[attacks]]\nname = "{attack}"\n' + ('eps = 0.2\nsteps = 3\n' if attack == "pgd" else "")
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=n, extra=extra))
    cell = next(c for c in expand(suite) if c.attack == attack)
    small, large = (Context(Settings(data_dir=str(data_dir), cache_dir=str(cache_dir), batch=b)) for b in batches)
    for early_stop in (False, True):
        crafted_small = craft_cell(cell, small, small.models.model(cell), early_stop=early_stop)[0]
        crafted_large = craft_cell(cell, large, large.models.model(cell), early_stop=early_stop)[0]
        assert torch.equal(crafted_small.x_adv, crafted_large.x_adv)
        if not early_stop:  # with early stops, a batch's backward pass also covers its images that just finished
            assert crafted_small.backwards == crafted_large.backwards > 0


def test_least_likely_targets_count_as_queries(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    extra = '[[attacks]]\nname = "fgsm"\neps = 0.1\ntarget = "least_likely"\n'
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=16, extra=extra))
    cell = next(c for c in expand(suite) if c.targeted)
    ctx = Context(Settings(data_dir=str(data_dir), cache_dir=str(cache_dir)))
    crafted, _, targets = craft_cell(cell, ctx, ctx.models.model(cell))
    assert targets is not None and crafted.forwards == 16 + 16 and crafted.backwards == 16


def test_art_class_gradient_takes_one_backward_pass() -> None:
    torch.manual_seed(0)
    model = CleverhansCNN(Dataset.MNIST.shape).eval().requires_grad_(False)
    x = torch.rand(30, *Dataset.MNIST.shape)
    labels = np.arange(30) % 10
    counted = CountingModel(model)
    classifier = _art.classifier(counted, x)
    fast = classifier.class_gradient(x.numpy(), label=labels)
    assert counted.backwards == 30
    slow = super(type(classifier), classifier).class_gradient(x.numpy(), label=labels)  # ART: once per label
    assert counted.backwards == 30 + 10 * 30
    assert fast.shape == slow.shape == (30, 1, *Dataset.MNIST.shape) and np.array_equal(fast, slow)


def test_perf_measures_and_counts_every_row(data_dir: Path, cache_dir: Path) -> None:
    settings = Settings(data_dir=str(data_dir), cache_dir=str(cache_dir), batch=8)
    rows, facts = perf.measure(Dataset.MNIST, settings, images=16, repeats=1, only=("fgsm",))
    assert [(r.measurement, r.implementation) for r in rows] == [
        ("(a) forward", "model"), ("(b) forward+backward", "model"), ("fgsm", "harness"), ("fgsm", "torchattacks"),
        ("fgsm", "ART")]
    harness, torchattacks = rows[2], rows[3]
    assert harness.k == 1 and harness.passes == torchattacks.passes == (1.0, 1.0)
    assert len(rows[1].rates) == 2 and all(r.rate > 0 for r in rows)  # (b): at the start and before fgsm
    assert facts["batch"] == 8 and 0.5 < facts["clean_acc"] <= 1
    assert "| fgsm " in perf.render(rows, facts, "bench perf")


def test_perf_write_keeps_hand_written_sections(tmp_path: Path) -> None:
    path = tmp_path / "perf.md"
    perf.write(path, f"{perf.BEGIN}\nfirst\n{perf.END}")
    path.write_text("# Performance\n" + path.read_text() + "\n## By hand\nkept\n")
    perf.write(path, f"{perf.BEGIN}\nsecond\n{perf.END}")
    text = path.read_text()
    assert text.startswith("# Performance\n") and "second" in text and "first" not in text
    assert text.rstrip().endswith("## By hand\nkept")


def test_perf_rejects_unknown_attacks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["perf", "--attacks", "pgd,square"]) == 2
    assert "--attacks pgd,square: unknown square" in capsys.readouterr().err


def test_craft_batches_follow_the_settings(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=20))
    cell = replace(expand(suite)[0], n=20)
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return self.model(x)

    ctx = Context(Settings(data_dir=str(data_dir), cache_dir=str(cache_dir), batch=8))
    craft_cell(cell, ctx, Spy(ctx.models.model(cell)))
    assert calls == [8, 8, 4]
