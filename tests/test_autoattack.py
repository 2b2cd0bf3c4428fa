"""The AutoAttack adapters (apgd_ce, apgd_dlr, fab) and the autoattack ensemble on a real (weak) MNIST CNN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import weak_mnist_cnn

from bench.attacks import REGISTRY
from bench.attacks.base import Runtime
from bench.bpda import bpda_model
from bench.errors import SuiteError
from bench.evaluate import CountingModel, project
from bench.grid import expand
from bench.models import DefendedModel
from bench.suite import load_suite
from bench.types import Dataset
from defenses import REGISTRY as DEFENSES

N = 48
SEED = 0
FAMILY = ("apgd_ce", "apgd_dlr", "fab")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(data_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    return weak_mnist_cnn(data_dir, N, SEED)


def attack(name: str, given: dict[str, Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
           seed: int = SEED) -> tuple[torch.Tensor, CountingModel]:
    """Run one adapter as the runner does (seeded torch RNG, counting wrapper): (raw output, counts)."""
    cls = REGISTRY.get(name)
    counted = CountingModel(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cls.resolve(given, Dataset.MNIST)).perturb(counted, x, y, eps, None), counted


def correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x).argmax(1) == y


@pytest.mark.parametrize(("name", "given", "eps"), [
    ("apgd_ce", {"steps": 10}, 0.1),
    ("apgd_ce", {"steps": 5, "restarts": 2, "eot": 2, "rho": 0.5}, 0.3),
    ("apgd_dlr", {"steps": 10}, 0.1),
    ("apgd_dlr", {"steps": 10, "targets": 3}, 0.1),
    ("fab", {"steps": 10}, 0.1),
    ("fab", {"steps": 10, "targets": 3, "restarts": 2}, 0.1),
])
def test_output_is_a_valid_image_batch_inside_the_ball(setup: Any, name: str, given: dict[str, Any],
                                                         eps: float) -> None:
    model, x, y = setup
    adv, _ = attack(name, given, model, x, y, eps)
    assert isinstance(adv, torch.Tensor) and adv.shape == x.shape and adv.dtype == x.dtype
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= eps + 1e-6  # already in the ball: the harness's projection changes nothing
    assert torch.allclose(project(adv, x, eps, "linf"), adv, atol=1e-6)
    fooled = ~correct(model, adv, y)
    changed = (adv != x).flatten(1).any(1)
    assert fooled[changed].all() and fooled.sum() > (~correct(model, x, y)).sum()  # only adversarial points return


@pytest.mark.parametrize(("name", "given"), [
    ("apgd_ce", {"restarts": 2}), ("apgd_dlr", {"targets": 2}), ("fab", {"restarts": 2}), ("fab", {"targets": 2}),
])
def test_a_batch_of_one_image(setup: Any, name: str, given: dict[str, Any]) -> None:
    """The last images still standing in an ensemble may be one: torchattacks squeezes index lists to 0-d there."""
    model, x, y = setup
    adv, _ = attack(name, {"steps": 3, **given}, model, x[:1], y[:1], 0.3)
    assert adv.shape == x[:1].shape and not adv.requires_grad and (adv - x[:1]).abs().max() <= 0.3 + 1e-6


def test_apgd_ce_fools_the_undefended_cnn_at_eps_03(setup: Any) -> None:
    model, x, y = setup
    clean = correct(model, x, y)
    adv, _ = attack("apgd_ce", {}, model, x, y, 0.3)  # AutoAttack's 100 steps
    assert (~correct(model, adv, y))[clean].float().mean() >= 0.95


def test_apgd_t_is_at_least_as_strong_as_apgd_ce(setup: Any) -> None:
    """At eps 0.1 about half the images stand; APGD-T over 3 targets leaves no more than APGD-CE (or one more)."""
    model, x, y = setup
    clean = correct(model, x, y)
    ce, _ = attack("apgd_ce", {"steps": 25}, model, x, y, 0.1)
    t, _ = attack("apgd_dlr", {"steps": 25, "targets": 3}, model, x, y, 0.1)
    robust_ce, robust_t = (correct(model, ce, y) & clean).sum(), (correct(model, t, y) & clean).sum()
    assert 0 < robust_ce < clean.sum()
    assert robust_t <= robust_ce + 1


def test_fab_t_finds_adversarial_points_inside_the_ball(setup: Any) -> None:
    """FAB minimises the L∞ distance: what it returns is adversarial and within eps, and at eps 0.3 it is nearly
    everything (FAB's points at eps 0.1 lie in the 0.3 ball too, so eps only decides which it may return)."""
    model, x, y = setup
    clean = correct(model, x, y)
    small, _ = attack("fab", {"steps": 20, "targets": 3}, model, x, y, 0.1)
    large, _ = attack("fab", {"steps": 20, "targets": 3}, model, x, y, 0.3)
    for adv, eps in ((small, 0.1), (large, 0.3)):
        assert (adv - x).abs().max() <= eps + 1e-6
        changed = (adv != x).flatten(1).any(1)
        assert not correct(model, adv, y)[changed].any()
    fooled_small, fooled_large = ~correct(model, small, y) & clean, ~correct(model, large, y) & clean
    assert fooled_large[clean].float().mean() >= 0.9
    assert (fooled_small & ~fooled_large).sum() == 0 and fooled_large.sum() > fooled_small.sum()


@pytest.mark.parametrize(("name", "given"), [
    ("apgd_ce", {"steps": 3}), ("apgd_dlr", {"steps": 3}), ("apgd_dlr", {"steps": 3, "targets": 2}),
])
def test_same_seed_same_result(setup: Any, name: str, given: dict[str, Any]) -> None:
    model, x, y = setup
    x, y = x[:8], y[:8]
    first = attack(name, given, model, x, y, 0.1, seed=1)[0]
    assert torch.equal(first, attack(name, given, model, x, y, 0.1, seed=1)[0])
    assert not torch.equal(first, attack(name, given, model, x, y, 0.1, seed=2)[0])


def test_fab_starts_at_the_image_so_its_first_run_ignores_the_seed(setup: Any) -> None:
    model, x, y = setup
    x, y = x[:8], y[:8]
    first = attack("fab", {"steps": 5, "targets": 2}, model, x, y, 0.1, seed=1)[0]
    assert torch.equal(first, attack("fab", {"steps": 5, "targets": 2}, model, x, y, 0.1, seed=2)[0])


def test_only_correctly_classified_images_are_attacked(setup: Any) -> None:
    """AutoAttack's rule inside each attack: an image the model already gets wrong costs one forward pass."""
    model, x, y = setup
    x, y = x[:16], y[:16]
    with torch.inference_mode():
        wrong = (model(x).argmax(1) + 1) % 10
    for name, given in [("apgd_ce", {"steps": 5}), ("apgd_dlr", {"steps": 5, "targets": 2}),
                        ("fab", {"steps": 5}), ("fab", {"steps": 5, "targets": 2})]:
        adv, counted = attack(name, given, model, x, wrong, 0.3)
        assert torch.equal(adv, x) and counted.backwards <= 1, name  # 1: the first image's zero-Jacobian check
    right = correct(model, x, y)
    _, counted = attack("apgd_ce", {"steps": 5}, model, x, y, 0.1)
    m = int(right.sum())
    assert counted.backwards == 6 * m + 1 and counted.forwards == len(x) + 6 * m + 1  # start point + 5 steps


def test_adapters_leave_the_models_training_flags_alone(setup: Any) -> None:
    """torchattacks calls ``model.train()`` after an attack when the module it was given was in training mode,
    which CountingModel (a fresh nn.Module) is: the defended model inside would be left in training mode."""
    model, x, y = setup
    for name, given in [("apgd_ce", {"steps": 2}), ("apgd_dlr", {"steps": 2, "targets": 1}), ("fab", {"steps": 2})]:
        attack(name, given, model, x[:4], y[:4], 0.1)
        assert not any(m.training for m in model.modules()), name


def test_bpda_breaks_the_zero_gradient_of_hard_quantization(setup: Any) -> None:
    """In front of the CNN, CQ's hard 2-level quantizer has zero gradient: white-box APGD-CE only gets its random
    start; through BPDA (straight-through backward) it gets the CNN's gradient and fools more."""
    model, x, y = setup
    cq = DEFENSES.get("cq")
    quantizer = cq(Dataset.MNIST, cq.resolve({"levels": 2, "hard": True}, Dataset.MNIST)).preprocess()
    defended = DefendedModel(quantizer, model).eval().requires_grad_(False)
    clean = correct(defended, x, y)
    white, counted = attack("apgd_ce", {"steps": 20}, defended, x, y, 0.3)
    through, _ = attack("apgd_ce", {"steps": 20}, bpda_model(defended), x, y, 0.3)
    assert counted.backwards > 0
    for adv in (white, through):
        assert torch.isfinite(adv).all() and (adv - x).abs().max() <= 0.3 + 1e-6
    robust_white = (correct(defended, white, y) & clean).sum()
    robust_bpda = (correct(defended, through, y) & clean).sum()
    assert robust_bpda < robust_white


def test_traits_and_parameters() -> None:
    for name in FAMILY:
        cls = REGISTRY.get(name)
        assert (cls.norm, cls.bounded, cls.gradient, cls.iterative, cls.check_convergence) == (
            "linf", True, True, True, True), name
        assert "ICML 2020" in cls.summary() and cls.param("steps").default == 100, name
        assert all(p.name != "target" for p in cls.params), name  # the goal is any misclassification
    assert REGISTRY.get("apgd_dlr").param("targets").default == 0 and REGISTRY.get("fab").param("targets").high == 9
    aa = REGISTRY.get("autoattack")
    assert aa.bounded and aa.norm == "linf" and not aa.check_convergence and "target" not in {p.name for p in aa.params}
    assert aa.make_id(aa.resolve({"version": "plus", "square_queries": 1000}, Dataset.MNIST), Dataset.MNIST) == (
        "autoattack(version=plus,queries=1000)")


def components(given: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    aa = REGISTRY.get("autoattack")
    ensemble = aa(aa.resolve(given, Dataset.MNIST))
    return [(label, adapter.name, adapter.values) for label, adapter in ensemble.components()]


def test_autoattack_components_follow_autoattacks_versions() -> None:
    apgd = {"steps": 100, "restarts": 1, "eot": 1, "rho": 0.75}
    square = ("square", "square", {"queries": 5000, "p_init": 0.8, "restarts": 1, "target": "none"})
    apgd_t = ("apgd-t", "apgd_dlr", {**apgd, "targets": 9})
    fab_t = ("fab-t", "fab", {"steps": 100, "restarts": 1, "targets": 9, "eot": 1})  # eot: the harness's
    assert components({}) == [("apgd-ce", "apgd_ce", apgd), apgd_t, fab_t, square]
    assert components({"version": "plus"}) == [
        ("apgd-ce", "apgd_ce", {**apgd, "restarts": 5}),
        ("apgd-dlr", "apgd_dlr", {**apgd, "restarts": 5, "targets": 0}),
        ("fab", "fab", {"steps": 100, "restarts": 5, "targets": 0, "eot": 1}), square, apgd_t, fab_t]
    assert components({"version": "rand"}) == [("apgd-ce", "apgd_ce", {**apgd, "eot": 20}),
                                               ("apgd-dlr", "apgd_dlr", {**apgd, "eot": 20, "targets": 0})]
    cheap = components({"steps": 20, "targets": 3, "square_queries": 300})
    assert [(label, v.get("steps"), v.get("targets"), v.get("queries")) for label, _, v in cheap] == [
        ("apgd-ce", 20, None, None), ("apgd-t", 20, 3, None), ("fab-t", 20, 3, None), ("square", None, None, 300)]
    for label, name, values in cheap:  # complete, valid values, as a suite would resolve them
        cls = REGISTRY.get(name)
        assert values == cls.resolve(values, Dataset.MNIST) and not cls({**values}).components(), label
        for p in cls.params:
            p.check(values[p.name], "<test>", p.name)


def test_autoattack_does_not_perturb_by_itself(setup: Any) -> None:
    model, x, y = setup
    with pytest.raises(RuntimeError, match="components"):
        attack("autoattack", {}, model, x[:2], y[:2], 0.3)


def test_suites_take_autoattack_and_reject_unknown_versions(tmp_path: Path) -> None:
    text = ('name = "t"\n[datasets.mnist]\nn = 10\n[[defenses]]\nname = "none"\n[[attacks]]\nname = "autoattack"\n'
            'eps = [0.1, 0.3]\nthreat = ["whitebox", "bpda"]\nsquare_queries = 1000\n')
    (tmp_path / "ok.toml").write_text(text)
    cells = expand(load_suite(tmp_path / "ok.toml"))
    assert len(cells) == 4 and {(c.attack, c.attack_values["square_queries"]) for c in cells} == {("autoattack", 1000)}
    (tmp_path / "bad.toml").write_text(text.replace("square_queries = 1000", 'version = "standart"'))
    with pytest.raises(SuiteError, match='did you mean "standard"'):
        expand(load_suite(tmp_path / "bad.toml"))


@pytest.mark.parametrize(("name", "given"), [
    ("apgd_ce", {"steps": 20, "restarts": 3}), ("apgd_dlr", {"steps": 20, "targets": 3}),
    ("fab", {"steps": 20, "targets": 3}), ("fab", {"steps": 20}),
])
def test_a_zero_jacobian_skips_the_steps_that_could_not_move_an_image(setup: Any, name: str,
                                                                     given: dict[str, Any]) -> None:
    """White-box against CQ's hard quantizer every input gradient is exactly zero: APGD stays at its random
    starts and FAB at the image, so with the savings on the adapter returns what torchattacks returns (the same
    images fooled, points within float rounding, the global RNG left in the same state) for one gradient per run
    instead of every step."""
    model, x, y = setup
    cq = DEFENSES.get("cq")
    quantizer = cq(Dataset.MNIST, cq.resolve({"levels": 2, "hard": True}, Dataset.MNIST)).preprocess()
    defended = DefendedModel(quantizer, model).eval().requires_grad_(False)
    runs = {}
    for early_stop in (False, True):
        cls = REGISTRY.get(name)
        adapter = cls(cls.resolve(given, Dataset.MNIST))
        adapter.runtime = Runtime(early_stop=early_stop)
        counted = CountingModel(defended)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            adv = adapter.perturb(counted, x, y, 0.3, None)
            runs[early_stop] = adv, counted.backwards, torch.rand(4)
    (adv_off, work_off, rng_off), (adv_on, work_on, rng_on) = runs[False], runs[True]
    assert torch.equal(correct(defended, adv_on, y), correct(defended, adv_off, y))
    assert (adv_on - adv_off).abs().max() <= 1e-6 and torch.equal(rng_on, rng_off)
    if name != "fab":
        assert not correct(defended, adv_on, y).all()  # the random starts fool some images
    assert work_on * 10 <= work_off


@pytest.mark.parametrize("name", ["apgd_ce", "fab"])
def test_a_model_with_gradients_runs_the_attack_unchanged(setup: Any, name: str) -> None:
    """On the plain CNN the zero-Jacobian check costs one image's gradient and changes nothing."""
    model, x, y = setup
    runs = {}
    for early_stop in (False, True):
        cls = REGISTRY.get(name)
        adapter = cls(cls.resolve({"steps": 5, "targets": 2} if name == "fab" else {"steps": 5}, Dataset.MNIST))
        adapter.runtime = Runtime(early_stop=early_stop)
        counted = CountingModel(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            runs[early_stop] = adapter.perturb(counted, x, y, 0.1, None), counted.backwards
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1] + 1
