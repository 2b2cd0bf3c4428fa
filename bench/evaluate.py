"""Evaluating one cell: the trained defended model, the model the threat lets the attacker use, the attack, and
the score on the real defended model.

:class:`Context` is a per-process memo of what cells share (data, trained models, clean predictions,
substitutes, transferred adversarial examples). It only caches pure functions of cell specs, so a cell's record
is the same whichever process computes it and in whatever order.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from threading import Event
from typing import Any

import torch
from torch import nn

from bench import data as data_mod
from bench import provenance
from bench.attacks import REGISTRY as ATTACKS
from bench.attacks.base import Attack
from bench.bpda import bpda_model
from bench.errors import BenchError, Interrupted
from bench.grid import NO_BPDA, Cell
from bench.models import SubstituteCNN, predict
from bench.results import pack_mask
from bench.substitute import oracle_labels, train_substitute
from bench.train import TRAIN_CODE_VERSION, ModelCache, TrainConfig, config_dict, default_cache_dir, fit
from bench.types import Dataset, Threat
from defenses import REGISTRY as DEFENSES
from defenses.base import Defense

IMAGE_BYTES = {Dataset.MNIST: 1 << 20, Dataset.CIFAR10: 3 << 19}  # attack working memory per image, see attack_batch
CPU_MAX_BATCH = 256
CHANGED = 1e-6  # a pixel value counts as changed (l0) when it moved by more than this


class AttackFailed(Exception):
    """An attack produced unusable output (NaN/inf, wrong shape)."""


@dataclass(frozen=True)
class Settings:
    """What a worker needs to evaluate cells; plain data, so executors can ship it to other processes."""

    data_dir: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    strict_data: bool = False
    batch: int | None = None  # images per attack call; None: attack_batch's choice


class CountingModel(nn.Module):
    """Counts the images ``model`` is queried on (forward) and back-propagated through (backward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forwards += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backwards += grad.shape[0]


@dataclass
class Context:
    """Per-process memo of what cells share; ``stop`` is set by Ctrl-C and checked between batches.

    ``calls`` counts how often each shared thing was actually computed (``trainings``, ``clean``, ...).
    """

    settings: Settings = field(default_factory=Settings)
    stop: Event = field(default_factory=Event)
    calls: Counter[str] = field(default_factory=Counter)
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.cache = ModelCache(Path(self.settings.cache_dir) if self.settings.cache_dir else default_cache_dir())

    def _cached(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self.calls[key[0]] += 1
            self._memo[key] = make()
        return self._memo[key]

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted

    # --- data -------------------------------------------------------------------------------------------------
    def data(self, dataset: Dataset) -> data_mod.Data:
        return self._cached(("data", dataset), lambda: data_mod.load(
            dataset, self.settings.data_dir, strict=self.settings.strict_data))

    def eval_set(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(test indices, images, labels) of the cell's evaluated images."""
        return self._cached(("eval_set", cell.dataset, cell.n, cell.sample, cell.seed), lambda: data_mod.subset(
            self.data(cell.dataset).test, cell.n, cell.sample, cell.seed))

    # --- models -----------------------------------------------------------------------------------------------
    def defense(self, cell: Cell) -> Defense:
        return DEFENSES.get(cell.defense)(cell.dataset, cell.defense_values)

    def train_config(self, cell: Cell) -> TrainConfig:
        return cell.train.with_overrides(self.defense(cell).training_overrides())

    def model_fields(self, cell: Cell) -> dict[str, Any]:
        """The model-cache key of the cell's defended classifier."""
        return {"kind": "classifier", "dataset": cell.dataset.value, "md5": self.data(cell.dataset).md5,
                "arch": "cleverhans-cnn", "weights": self.defense(cell).weights_key(),
                "train": config_dict(self.train_config(cell)), "seed": cell.seed, "code": TRAIN_CODE_VERSION}

    def model_label(self, cell: Cell) -> str:
        return self.defense(cell).weights_label()

    def model(self, cell: Cell) -> nn.Module:
        """The trained defended model of the cell (from the cache, or trained now), frozen, in eval mode."""
        return self._trained(cell)[0]

    def model_facts(self, cell: Cell) -> dict[str, Any]:
        """What the cache knows of the cell's model: ``test_acc`` (full test set), ``train_seconds``, ``cached``."""
        return self._trained(cell)[1]

    def _trained(self, cell: Cell) -> tuple[nn.Module, dict[str, Any]]:
        return self._cached(("model", cell.dataset, cell.defense, repr(cell.defense_values), repr(cell.train),
                             cell.seed), lambda: self._load_or_train(cell))

    def _load_or_train(self, cell: Cell) -> tuple[nn.Module, dict[str, Any]]:
        defense = self.defense(cell)
        if defense.shares_weights_with_none:
            undefended, facts = self._trained(replace(cell, defense="none", defense_values={}))
            model = defense.build()
            model.load_state_dict(undefended.state_dict())
            return model.to(self.settings.device).eval().requires_grad_(False), facts
        data = self.data(cell.dataset)
        cfg = self.train_config(cell)

        def build() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cell.seed)
                return defense.build()

        def train(model: nn.Module) -> dict[str, Any]:
            self.calls["trainings"] += 1
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cell.seed)
                fit(model, data.train.x, data.train.y, cfg, cell.seed, batch_hook=defense.training_batch,
                    step_hook=defense.after_step, device=self.settings.device,
                    desc=f"train {cell.dataset.value} {defense.id}", should_stop=self.stop.is_set)
            correct = (predict(model, data.test.x) == data.test.y).float()
            return {"test_acc": round(float(correct.mean()), 4),
                    "test_acc_first_1000": round(float(correct[:1000].mean()), 4)}

        def verify(model: nn.Module) -> dict[str, float]:
            """A cached model's accuracy on the first 1,000 test images: cheap, and its sidecar must agree."""
            first = (predict(model, data.test.x[:1000]) == data.test.y[:1000]).float()
            return {"test_acc_first_1000": round(float(first.mean()), 4)}

        model, facts = self.cache.get_or_train(cell.dataset.value, self.model_label(cell), self.model_fields(cell),
                                               build, train, verify)
        return model.to(self.settings.device).eval().requires_grad_(False), facts

    def clean_predictions(self, cell: Cell) -> torch.Tensor:
        """Clean predictions of the defended model on the evaluated images: once per (dataset, defense)."""
        return self._cached(("clean", cell.dataset, cell.defense, repr(cell.defense_values), repr(cell.train),
                             cell.seed, cell.n, cell.sample),
                            lambda: predict(self.model(cell), self.eval_set(cell)[1]))

    def detector(self, cell: Cell) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._cached(("detector", cell.dataset, cell.defense, repr(cell.defense_values), repr(cell.train),
                             cell.seed), lambda: self.defense(cell).detector(self.model(cell),
                                                                             self.data(cell.dataset).train.x))

    # --- black-box --------------------------------------------------------------------------------------------
    def holdout(self, cell: Cell) -> torch.Tensor:
        """The attacker's images: a seeded sample of test images disjoint from the evaluated ones."""
        assert cell.blackbox is not None
        index, _, _ = self.eval_set(cell)
        test = self.data(cell.dataset).test
        free = torch.ones(len(test), dtype=torch.bool)
        free[index] = False
        candidates = free.nonzero().flatten()
        size = cell.blackbox["holdout"]
        if len(candidates) < size:
            raise BenchError(f"blackbox needs {size} test images disjoint from the {cell.n} evaluated ones, only "
                             f"{len(candidates)} are left; lower n or blackbox.holdout")
        pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(cell.seed))[:size]
        return test.x[candidates[pick.sort().values]]

    def oracle_cell(self, cell: Cell) -> Cell:
        """Whose labels train the substitute: the target itself, or the undefended model (shared substitute)."""
        assert cell.blackbox is not None
        if cell.blackbox["oracle"] == "undefended":
            return replace(cell, defense="none", defense_values={})
        return cell

    def substitute_fields(self, cell: Cell) -> dict[str, Any]:
        """The substitute's cache key: the oracle's weights *and* its whole defense (defenses that share weights,
        like feature squeezing, still label differently), the black-box settings and the holdout."""
        oracle = self.oracle_cell(cell)
        return {"kind": "substitute", "oracle": self.model_fields(oracle), "oracle_defense": self.defense(oracle).id,
                "blackbox": cell.blackbox, "n": cell.n, "sample": cell.sample, "seed": cell.seed,
                "code": TRAIN_CODE_VERSION}

    def substitute_label(self, cell: Cell) -> str:
        return f"substitute-{self.defense(self.oracle_cell(cell)).id}"

    def substitute(self, cell: Cell) -> tuple[nn.Module, dict[str, Any]]:
        """The trained substitute of the cell and its facts (label queries); trained once, then cached."""
        fields = self.substitute_fields(cell)
        oracle_cell = self.oracle_cell(cell)

        def make() -> tuple[nn.Module, dict[str, Any]]:
            def train(model: nn.Module) -> dict[str, Any]:
                self.calls["substitute_trainings"] += 1
                oracle = self.model(oracle_cell)
                trained, facts = train_substitute(lambda x: oracle_labels(oracle, x), self.holdout(cell),
                                                  cell.dataset.shape, cell.blackbox, cell.seed, self.settings.device)
                model.load_state_dict(trained.state_dict())
                return facts

            model, facts = self.cache.get_or_train(cell.dataset.value, self.substitute_label(cell), fields,
                                                   lambda: SubstituteCNN(cell.dataset.shape), train)
            return model.to(self.settings.device).eval().requires_grad_(False), facts

        return self._cached(("substitute", repr(fields)), make)

    def transfer(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, CountingModel]:
        """Adversarial examples crafted on the substitute: once per (substitute, attack, eps), shared by every
        defense that shares the substitute (``oracle = "undefended"``)."""
        key = repr((self.substitute_fields(cell), cell.attack, cell.attack_values, cell.eps))
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        return self._cached(("transfer", key), lambda: self.craft(cell, self.substitute(cell)[0], seed))

    # --- attacks ----------------------------------------------------------------------------------------------
    def craft(self, cell: Cell, attacked: nn.Module, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor | None, CountingModel]:
        """Run the cell's attack on ``attacked`` in batches; returns (x_adv, image index per attempt, targets,
        the counting wrapper). Raw attack output, clipped by the caller."""
        _, x, y = self.eval_set(cell)
        attack = ATTACKS.get(cell.attack)(cell.attack_values)
        counted = CountingModel(attacked)
        generator = torch.Generator().manual_seed(seed)
        rep, targets = choose_targets(attack.target_mode, y, lambda xb: _logits(counted, xb), x, generator)
        x_rep, y_rep = x[rep], y[rep]
        device = self.settings.device
        batch = self.settings.batch or attack_batch(cell.dataset, device)
        out = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(0, len(rep), batch):
                self.check_stop()
                xb, yb = x_rep[i:i + batch].to(device), y_rep[i:i + batch].to(device)
                tb = None if targets is None else targets[i:i + batch].to(device)
                adv = attack.perturb(counted, xb, yb, cell.eps, tb)
                if not isinstance(adv, torch.Tensor) or adv.shape != xb.shape:
                    raise AttackFailed(f"{cell.attack} returned {getattr(adv, 'shape', type(adv).__name__)}, "
                                       f"expected {tuple(xb.shape)}")
                if not torch.isfinite(adv).all():
                    raise AttackFailed(f"{cell.attack} produced NaN or inf values")
                out.append(adv.detach().cpu())
        return torch.cat(out), rep, targets, counted


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def attack_batch(dataset: Dataset, device: str) -> int:
    """Images per attack call: the largest power of two whose working memory (``IMAGE_BYTES``: about twice the
    measured peak of a forward+backward pass, 0.47 MiB per image on MNIST and 0.65 on CIFAR-10 for the heaviest
    defense, DQA) fits in an eighth of the device's *total* memory; on a CPU at most ``CPU_MAX_BATCH``.

    The CPU cap is measured on 2 cores (results/perf.md): forward+backward images/s is flat from 128 to 512 images
    on MNIST (64 to 256 on CIFAR-10) and 15-20 % lower beyond, when the activations fall out of cache. Total
    rather than free memory keeps the choice the same on every run of a machine: the batch does not change
    FGSM/BIM/PGD/JSMA results (bit for bit), but attacks that decide per batch change with it (C&W's early stop,
    HSJA's starting points, Square's seeds).
    """
    if device.startswith("cuda"):
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = 1 << max(0, (memory // 8 // IMAGE_BYTES[dataset]).bit_length() - 1)
    return fits if device.startswith("cuda") else min(fits, CPU_MAX_BATCH)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])


def choose_targets(mode: str, y: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image index of each attempt, target labels or None). Targets never equal the true label."""
    n, classes = len(y), 10
    index = torch.arange(n)
    if mode == "none":
        return index, None
    if mode == "random":
        return index, (y + torch.randint(1, classes, (n,), generator=generator)) % classes
    if mode == "next":
        return index, (y + 1) % classes
    if mode == "least_likely":
        scores = logits(x).clone()
        scores[index, y] = float("inf")
        return index, scores.argmin(1)
    if mode == "all":
        rep = index.repeat_interleave(classes - 1)
        offsets = torch.arange(1, classes).repeat(n)
        return rep, (y[rep] + offsets) % classes
    raise ValueError(f"unknown target mode {mode!r}")


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | None, norm: str) -> torch.Tensor:
    """Clip to [0, 1] and into the eps ball around ``x`` (L∞ or L2); the harness never trusts the attack."""
    if eps is not None:
        delta = x_adv - x
        if norm == "l2":
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (eps / norms).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))
        else:
            delta = delta.clamp(-eps, eps)
        x_adv = x + delta
    return x_adv.clamp(0.0, 1.0)


def per_image(ok: torch.Tensor, n: int) -> torch.Tensor:
    """Per image: True only if every attempt on it (one, or one per target class) is True."""
    return ok.reshape(n, -1).all(1)


def _mean(values: torch.Tensor) -> float | None:
    return round(float(values.mean()), 6) if len(values) else None


def record_base(cell: Cell) -> dict[str, Any]:
    """The fields identifying a cell, shared by result and error records."""
    return {
        "suite": cell.suite, "dataset": cell.dataset.value, "defense": cell.defense_id, "defense_name": cell.defense,
        "defense_params": {k: list(v) if isinstance(v, tuple) else v for k, v in cell.defense_values.items()},
        "attack": cell.attack_id, "attack_name": cell.attack, "attack_params": cell.attack_values,
        "threat": cell.threat.value, "threat_params": cell.threat_params, "threat_label": cell.threat_label,
        "eps": cell.eps, "targeted": cell.targeted, "target": cell.attack_values.get("target", "none"),
        "norm": ATTACKS.get(cell.attack).bound_norm(), "gradient_free": not ATTACKS.get(cell.attack).gradient,
        "iterative": ATTACKS.get(cell.attack).iterative, "purpose": cell.purpose, "n": cell.n,
        "seed": cell.cell_seed, "suite_seed": cell.seed, "cell_id": cell.key, "compute_id": cell.compute_key,
        "sample": cell.sample,  # with n, dataset and suite_seed: which images the masks index (results.group_key)
        **provenance.stamp(),
    }


def run_cell(cell: Cell, ctx: Context) -> dict[str, Any]:
    """Evaluate one cell and return its record (see README "Results" for the fields).

    ``seconds`` covers the attack and its scoring; training and loading the shared models are not counted.
    """
    data = ctx.data(cell.dataset)
    _, x, y = ctx.eval_set(cell)
    model = ctx.model(cell)
    clean = ctx.clean_predictions(cell)
    attack_cls: type[Attack] = ATTACKS.get(cell.attack)
    extra: dict[str, Any] = {}
    substitute, facts = ctx.substitute(cell) if cell.threat is Threat.BLACKBOX else (None, {})
    start = time.perf_counter()
    if substitute is not None:
        x_adv, rep, targets, counted = ctx.transfer(cell)
        extra = {"label_queries": facts.get("label_queries"),
                 "substitute_agreement": round(float((predict(substitute, x) == clean).float().mean()), 6)}
    else:
        attacked = model
        backward = cell.threat_params.get("backward")
        if cell.threat is Threat.BPDA and backward != NO_BPDA:
            attacked = bpda_model(model, backward, cell.threat_params.get("z", 1.0))
        x_adv, rep, targets, counted = ctx.craft(cell, attacked, cell.cell_seed)
    attack_seconds = time.perf_counter() - start
    x_adv = project(x_adv, x[rep], cell.eps, attack_cls.bound_norm())
    pred = predict(model, x_adv)
    y_rep = y[rep]
    correct = pred == y_rep
    success = correct.logical_not() if targets is None else pred == targets
    robust = per_image(correct, len(y))
    delta = (x_adv - x[rep]).flatten(1)[success]
    record = {
        **record_base(cell),
        "clean_acc": round(float((clean == y).float().mean()), 6),
        "robust_acc": round(float(robust.float().mean()), 6),
        "success_rate": round(float(success.float().mean()), 6),
        "attempts": len(rep),
        "l0": _mean((delta.abs() > CHANGED).float().mean(1)),
        "l2": _mean(delta.norm(dim=1)),
        "linf": _mean(delta.abs().amax(1)) if len(delta) else None,
        "queries": counted.forwards, "gradients": counted.backwards,
        "clean_mask": pack_mask((clean == y).tolist()), "robust_mask": pack_mask(robust.tolist()),
        **extra,
        "model_test_acc": ctx.model_facts(cell).get("test_acc"),
        "data_official": data.official, "data_provenance": data.provenance, "device": ctx.settings.device,
        "attack_seconds": round(attack_seconds, 3), "error": None,
    }
    detect = ctx.detector(cell)
    if detect is not None:
        flagged = detect(x_adv)
        defended = per_image(correct | flagged, len(y))
        record["detected_acc"] = round(float(defended.float().mean()), 6)
        record["detected_mask"] = pack_mask(defended.tolist())
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def error_record(cell: Cell, exc: BaseException, seconds: float) -> dict[str, Any]:
    """The record of a cell whose attack raised or produced unusable output: the grid goes on without it."""
    return {**record_base(cell), "clean_acc": None, "robust_acc": None, "success_rate": None, "l0": None,
            "l2": None, "linf": None, "seconds": round(seconds, 3), "error": f"{type(exc).__name__}: {exc}"}
