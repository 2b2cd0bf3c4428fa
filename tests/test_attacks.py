"""The attack adapters on a real (weak) MNIST CNN: valid outputs, budgets, success, query counts, determinism."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import weak_mnist_cnn

from bench.attacks import REGISTRY
from bench.attacks.base import Runtime
from bench.craft import CountingModel, choose_targets, project
from bench.types import Dataset

N = 16
HSJA = {"max_iter": 2, "max_eval": 50, "init_eval": 10}  # cheap: HSJA queries one image at a time
SEED = 0

# name, parameters (kept cheap), eps: one case per adapter and mode
CASES: list[tuple[str, dict[str, Any], float | None]] = [
    ("fgsm", {}, 0.3),
    ("bim", {"steps": 5}, 0.3),
    ("pgd", {"steps": 10}, 0.1),
    ("pgd", {"steps": 10, "restarts": 3}, 0.1),
    ("cw_l2", {"steps": 30, "c": 10.0, "lr": 0.1}, None),
    ("cw_l2", {"steps": 30, "c": 10.0, "lr": 0.1, "clip_linf": 0.1, "target": "random"}, 0.1),
    ("jsma", {}, None),
    ("deepfool", {"steps": 10}, None),
    ("square", {"queries": 100}, 0.3),
    ("hsja", HSJA, 0.3),
    ("hsja", {**HSJA, "norm": "l2", "target": "random"}, 0.3),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(data_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    return weak_mnist_cnn(data_dir, N, SEED)


def targets_for(y: torch.Tensor) -> torch.Tensor:
    return (y + torch.randint(1, 10, y.shape, generator=torch.Generator().manual_seed(SEED))) % 10


def attack(name: str, given: dict[str, Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
           eps: float | None, seed: int = SEED,
           early_stop: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, CountingModel]:
    """Run one adapter as the runner does (seeded torch RNG, counting wrapper): (raw output, targets, counts)."""
    cls = REGISTRY.get(name)
    adapter = cls(cls.resolve(given, Dataset.MNIST))
    adapter.runtime = Runtime(early_stop=early_stop)
    target = None if adapter.target_mode == "none" else targets_for(y)
    counted = CountingModel(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return adapter.perturb(counted, x, y, eps, target), target, counted


def fooled(model: torch.nn.Module, adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    with torch.inference_mode():
        pred = model(adv).argmax(1)
    return pred != y if target is None else pred == target


@pytest.mark.parametrize(("name", "given", "eps"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_output_is_a_valid_image_batch_within_budget(setup: Any, name: str, given: dict[str, Any],
                                                     eps: float | None) -> None:
    model, x, y = setup
    if name == "hsja":
        x, y = x[:4], y[:4]
    adv, _, _ = attack(name, given, model, x, y, eps)
    assert isinstance(adv, torch.Tensor) and adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    cls = REGISTRY.get(name)
    if cls.bounded and name != "hsja":  # hsja is minimum-norm; the harness projects it (checked below)
        assert (adv - x).abs().max() <= eps + 1e-6
    if eps is not None:
        projected = project(adv, x, eps, cls.norm)
        assert (projected - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("mode", ["random", "next", "least_likely", "all"])
def test_the_harness_never_targets_the_true_label(mode: str) -> None:
    y = torch.arange(1000) % 10
    scores = torch.randn(1000, 10, generator=torch.Generator().manual_seed(1))
    scores[torch.arange(1000), y] = -100.0  # the true class is the least likely: it must still not be picked
    index, target = choose_targets(mode, y, lambda _: scores, torch.zeros(1000), torch.Generator().manual_seed(0))
    assert target is not None and (target != y[index]).all()
    if mode == "all":
        assert torch.equal(index, torch.arange(1000).repeat_interleave(9))
        assert all(len(set(row.tolist())) == 9 for row in target.view(1000, 9))
    else:
        assert torch.equal(index, torch.arange(1000))
    if mode == "random":
        again = choose_targets(mode, y, lambda _: scores, torch.zeros(1000), torch.Generator().manual_seed(0))[1]
        other = choose_targets(mode, y, lambda _: scores, torch.zeros(1000), torch.Generator().manual_seed(1))[1]
        assert torch.equal(target, again) and not torch.equal(target, other)
        assert len(target.unique()) == 10
    if mode == "least_likely":
        assert torch.equal(target, scores.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), torch.inf).argmin(1))


def test_traits_match_how_the_runner_projects() -> None:
    cw = REGISTRY.get("cw_l2")
    assert cw.clip_param == "clip_linf" and cw.norm == "l2" and cw.bound_norm() == "linf"
    assert REGISTRY.get("hsja").bounded and REGISTRY.get("hsja").norm == "linf"
    assert not REGISTRY.get("square").gradient and not REGISTRY.get("hsja").gradient
    assert REGISTRY.get("pgd").check_convergence
    assert "none" not in REGISTRY.get("jsma").param("target").choices
    assert all(p.name != "target" for p in REGISTRY.get("deepfool").params)


@pytest.mark.parametrize(("name", "given", "eps", "least"), [
    ("bim", {"target": "random"}, 0.3, 0.8),
    ("pgd", {"steps": 20, "target": "random"}, 0.3, 0.8),
    ("cw_l2", {"c": 10.0, "lr": 0.1, "target": "random"}, None, 0.6),
    ("jsma", {}, None, 0.6),
    ("square", {"queries": 300, "target": "random"}, 0.3, 0.3),
])
def test_targeted_attacks_reach_their_target(setup: Any, name: str, given: dict[str, Any], eps: float | None,
                                             least: float) -> None:
    model, x, y = setup
    adv, target, _ = attack(name, given, model, x, y, eps)
    assert target is not None and (target != y).all()
    assert fooled(model, adv, y, target).float().mean() >= least


@pytest.mark.parametrize(("name", "given", "eps"), [
    ("bim", {}, 0.3), ("pgd", {"steps": 20}, 0.3), ("cw_l2", {"c": 10.0, "lr": 0.1}, None),
    ("deepfool", {}, None), ("square", {"queries": 300}, 0.3),
])
def test_untargeted_attacks_fool_fgsm_easy_images(setup: Any, name: str, given: dict[str, Any],
                                                  eps: float | None) -> None:
    model, x, y = setup
    easy = fooled(model, attack("fgsm", {}, model, x, y, 0.3)[0], y, None)
    assert easy.sum() >= N // 2
    adv, _, _ = attack(name, given, model, x[easy], y[easy], eps)
    if eps is not None:
        adv = project(adv, x[easy], eps, REGISTRY.get(name).norm)
    assert fooled(model, adv, y[easy], None).float().mean() >= 0.8


def test_cw_moves_pixels_at_the_ends_of_the_box(setup: Any) -> None:
    """torchattacks maps pixels at exactly 0 or 1 to ±inf in tanh space, where they can never move; most of an
    MNIST image is such pixels (the adapter starts at 0.999999 of the way, as Carlini's code does)."""
    model, x, y = setup
    adv, _, _ = attack("cw_l2", {}, model, x, y, None)
    ends = (x == 0) | (x == 1)
    assert ends.float().mean() > 0.5
    assert ((adv - x).abs() > 0.01)[ends].sum() > 10 * N


@pytest.mark.parametrize(("norm", "target"), [("l2", "none"), ("l2", "random"), ("linf", "none")])
def test_hsja_moves_towards_the_image_and_stays_adversarial(setup: Any, norm: str, target: str) -> None:
    """It starts at the nearest batch image already in another (the target) class and gets closer in its norm."""
    model, x, y = setup
    x, y = x[:10], y[:10]
    adv, goal, _ = attack("hsja", {**HSJA, "norm": norm, "target": target}, model, x, y, None)
    with torch.inference_mode():
        pred = model(x).argmax(1)
    usable = pred[None, :] != pred[:, None] if goal is None else pred[None, :] == goal[:, None]
    flat = x.flatten(1)
    nearest = torch.cdist(flat, flat).masked_fill(~usable, torch.inf).argmin(1)
    attacked = ((pred == y) if goal is None else (pred != goal)) & usable.any(1)
    assert attacked.sum() >= 3
    assert fooled(model, adv, y, goal)[attacked].all()
    assert torch.equal(adv[~attacked], x[~attacked])
    start, end = (x[nearest] - x).flatten(1)[attacked], (adv - x).flatten(1)[attacked]
    size = (lambda d: d.norm(dim=1)) if norm == "l2" else (lambda d: d.abs().amax(1))
    closer = size(end) < size(start)  # ART ends on a gradient step, which may move one image a little away
    assert closer.float().mean() >= 0.6 and size(end).mean() < 0.9 * size(start).mean()


def test_pgd_restarts_keep_every_success_of_a_single_run(setup: Any) -> None:
    model, x, y = setup
    single, _, _ = attack("pgd", {"steps": 5}, model, x, y, 0.08)
    several, _, counted = attack("pgd", {"steps": 5, "restarts": 4}, model, x, y, 0.08)
    once, more = fooled(model, single, y, None), fooled(model, several, y, None)
    assert (once & ~more).sum() == 0 and more.sum() >= once.sum()
    assert torch.equal(several[once], single[once])  # the first run is the single run; its successes are kept
    assert counted.backwards > 5 * N  # the later runs attacked the images still correct


def test_query_counts(setup: Any) -> None:
    model, x, y = setup
    b = len(x)
    _, _, counted = attack("fgsm", {}, model, x, y, 0.3)
    assert counted.backwards == counted.forwards == b
    for name, given, steps in [("bim", {"steps": 7}, 7), ("pgd", {"steps": 9}, 9)]:
        _, _, counted = attack(name, given, model, x, y, 0.3, early_stop=False)
        assert counted.backwards == steps * b and counted.forwards == (steps + 1) * b, name  # + the final check
        _, _, saving = attack(name, given, model, x, y, 0.3)
        assert saving.backwards < counted.backwards and saving.forwards < counted.forwards, name
    _, _, counted = attack("cw_l2", {"steps": 20}, model, x, y, None)
    assert counted.forwards == counted.backwards and counted.backwards % b == 0 and b <= counted.backwards <= 20 * b
    _, _, counted = attack("square", {"queries": 50}, model, x, y, 0.1)
    assert counted.backwards == 0 and 2 * b <= counted.forwards <= b + b * (50 + 2)
    _, _, counted = attack("hsja", HSJA, model, x[:4], y[:4], 0.1)
    assert counted.backwards == 0 and counted.forwards > 4 * 10
    _, _, counted = attack("jsma", {}, model, x, y, None)
    assert 0 < counted.backwards <= 10 * counted.forwards
    _, _, counted = attack("deepfool", {"steps": 5}, model, x, y, None)
    assert counted.backwards % 10 == 0 and counted.backwards > 0


@pytest.mark.parametrize(("name", "given", "eps"), [
    ("pgd", {"steps": 3}, 0.1), ("square", {"queries": 30}, 0.3),
    ("hsja", {**HSJA, "max_iter": 1}, 0.1),
])
def test_same_seed_same_result(setup: Any, name: str, given: dict[str, Any], eps: float) -> None:
    model, x, y = setup
    x, y = x[:4], y[:4]
    first = attack(name, given, model, x, y, eps, seed=1)[0]
    assert torch.equal(first, attack(name, given, model, x, y, eps, seed=1)[0])
    assert not torch.equal(first, attack(name, given, model, x, y, eps, seed=2)[0])


def test_minimum_norm_adapters_leave_misclassified_images_alone(setup: Any) -> None:
    model, x, y = setup
    with torch.inference_mode():
        wrong = (model(x).argmax(1) + 1) % 10  # every image is misclassified with respect to these labels
    for name, given in [("deepfool", {"steps": 5}), ("hsja", HSJA)]:
        adv, _, counted = attack(name, given, model, x[:8], wrong[:8], 0.3)
        assert torch.equal(adv, x[:8]) and counted.forwards == 8, name


def test_jsma_changes_at_most_gamma_of_the_pixels(setup: Any) -> None:
    model, x, y = setup
    adv, _, _ = attack("jsma", {"gamma": 0.05}, model, x, y, None)
    changed = ((adv - x).abs() > 1e-6).flatten(1).sum(1)
    assert changed.max() <= 0.05 * 784 + 2  # ART stops after the step that crosses gamma (two pixels a step)


def test_hsja_refuses_init_eval_above_max_eval(setup: Any) -> None:
    model, x, y = setup
    with pytest.raises(ValueError, match="init_eval"):
        attack("hsja", {"max_eval": 10, "init_eval": 20}, model, x[:2], y[:2], 0.1)


def test_art_adapters_do_not_import_torchvision(setup: Any) -> None:
    model, x, y = setup
    for name in ("jsma", "deepfool"):
        attack(name, {}, model, x[:2], y[:2], None)
    attack("hsja", {**HSJA, "max_iter": 1}, model, x[:2], y[:2], 0.1)
    assert "torchvision" not in sys.modules


def test_cw_with_clip_linf_optimises_within_the_box(setup: Any) -> None:
    """With ``clip_linf`` the C&W change of variables maps onto the L∞ box, so its output needs no projection and
    fools far more images than the unconstrained result projected into the box afterwards."""
    model, x, y = setup
    given = {"c": 10.0, "lr": 0.1, "clip_linf": 0.1}
    boxed, _, _ = attack("cw_l2", given, model, x, y, 0.1)
    assert (boxed - x).abs().max() <= 0.1 + 1e-6 and boxed.min() >= 0 and boxed.max() <= 1
    free, _, _ = attack("cw_l2", {**given, "clip_linf": None}, model, x, y, None)
    projected = project(free, x, 0.1, "linf")
    assert fooled(model, boxed, y, None).float().mean() >= 2 * fooled(model, projected, y, None).float().mean()
    assert fooled(model, boxed, y, None).float().mean() >= 0.3  # 7 of 16 (PGD-20 at 0.1: 8 of 16)
