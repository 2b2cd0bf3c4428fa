"""The model provider: the data, the evaluated images, and every trained network a cell needs (defended models,
their clean predictions and detectors, black-box substitutes), from the model cache or trained now.

One job: hand out trained models. It memoises pure functions of cell specs only, so a cell's record is the same
whichever process computes it and in whatever order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from threading import Event
from typing import Any

import torch
from torch import nn

from bench import data as data_mod
from bench.errors import BenchError
from bench.grid import Cell
from bench.models import DefendedModel, SubstituteCNN, predict
from bench.plugins import load_model, state_sha256
from bench.registry import AUTO
from bench.resilience import auto_levels
from bench.settings import Settings
from bench.substitute import oracle_labels, train_substitute
from bench.train import TRAIN_CODE_VERSION, ModelCache, TrainConfig, cache_key, config_dict, default_cache_dir, fit
from defenses import REGISTRY as DEFENSES
from defenses.base import Defense


def weights_digest(facts: dict[str, Any]) -> str | None:
    """A record's ``weights``: the first 16 hex digits of a model's ``weights_sha256`` fact (None without one)."""
    digest = facts.get("weights_sha256")
    return digest[:16] if digest else None


class Models:
    """Per-process memo of data and trained models; ``calls`` counts what was actually computed (``trainings``,
    ``clean``, ...); ``stop`` interrupts training between batches."""

    def __init__(self, settings: Settings, stop: Event | None = None) -> None:
        self.settings = settings
        self.stop = stop or Event()
        self.calls: Counter[str] = Counter()
        self.cache = ModelCache(Path(settings.cache_dir) if settings.cache_dir else default_cache_dir())
        self._memo: dict[tuple[Any, ...], Any] = {}

    def _cached(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self.calls[key[0]] += 1
            self._memo[key] = make()
        return self._memo[key]

    # --- data -------------------------------------------------------------------------------------------------
    def data(self, dataset: Any) -> data_mod.Data:
        return self._cached(("data", dataset), lambda: data_mod.load(
            dataset, self.settings.data_dir, strict=self.settings.strict_data))

    def eval_set(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(test indices, images, labels) of the cell's evaluated images."""
        return self._cached(("eval_set", cell.dataset, cell.n, cell.sample, cell.seed), lambda: data_mod.subset(
            self.data(cell.dataset).test, cell.n, cell.sample, cell.seed))

    # --- defended models --------------------------------------------------------------------------------------
    def defense(self, cell: Cell) -> Defense:
        """The cell's defense; ``levels = "auto"`` becomes the error-resilience analysis's recommendation (which
        trains the undefended model if the cache does not hold it)."""
        values = cell.defense_values
        if values.get("levels") == AUTO:
            values = {**values, "levels": self._cached(
                ("levels", cell.dataset, repr(cell.train), cell.seed, repr(cell.resilience)),
                lambda: auto_levels(self, cell))}
        return DEFENSES.get(cell.defense)(cell.dataset, values)

    def train_config(self, cell: Cell) -> TrainConfig:
        return cell.train.with_overrides(self.defense(cell).training_overrides())

    def model_fields(self, cell: Cell) -> dict[str, Any]:
        """The model-cache key of the cell's defended classifier (a user's classifier is never trained or stored:
        its fields name its weights and the defense in front of it)."""
        if cell.model is not None:
            return {"kind": "user-classifier", "dataset": cell.dataset.value, "model": cell.model["ref"],
                    "sha256": cell.model["sha256"], "weights": self.defense(cell).weights_key()}
        return {"kind": "classifier", "dataset": cell.dataset.value, "md5": self.data(cell.dataset).md5,
                "arch": "cleverhans-cnn", "weights": self.defense(cell).weights_key(),
                "train": config_dict(self.train_config(cell)), "seed": cell.seed, "code": TRAIN_CODE_VERSION}

    def model_label(self, cell: Cell) -> str:
        return self.defense(cell).weights_label()

    def model_key(self, cell: Cell) -> str:
        """Identifies the defended model as evaluated: its weights and the whole defense (defenses that share
        weights, like feature squeezing, still compute differently)."""
        return f"{cache_key(self.model_fields(cell))}:{self.defense(cell).id}"

    def model(self, cell: Cell) -> nn.Module:
        """The trained defended model of the cell (from the cache, or trained now), frozen, in eval mode."""
        return self._trained(cell)[0]

    def model_facts(self, cell: Cell) -> dict[str, Any]:
        """What the cache knows of the cell's model: ``test_acc`` (full test set), ``train_seconds``, ``cached``."""
        return self._trained(cell)[1]

    def weights_digest(self, cell: Cell) -> str | None:
        """The first 16 hex digits of the sha256 of the trained weights the cell evaluates (None for a user's
        classifier, whose suite entry pins its sha256)."""
        return weights_digest(self.model_facts(cell))

    def cached_facts(self, cell: Cell) -> dict[str, Any] | None:
        """The sidecar facts of the cell's trained model if the cache holds it (nothing is loaded or trained);
        None for a user's classifier or a model not trained yet."""
        if cell.model is not None:
            return None
        if self.defense(cell).shares_weights_with_none:
            cell = replace(cell, defense="none", defense_values={})
        return self.cache.facts(cell.dataset.value, self.model_label(cell), self.model_fields(cell))

    def _trained(self, cell: Cell) -> tuple[nn.Module, dict[str, Any]]:
        return self._cached(("model", cell.dataset, cell.defense, repr(cell.defense_values), repr(cell.train),
                             cell.seed), lambda: self._load_or_train(cell))

    def _user_classifier(self, cell: Cell) -> tuple[nn.Module, dict[str, Any]]:
        """The user's trained classifier behind the cell's preprocessing (never trained here)."""
        spec = cell.model or {}
        classifier = load_model(spec["ref"], spec["file"], cell.dataset.shape)
        if state_sha256(classifier) != spec["sha256"]:
            raise BenchError(f"{spec['ref']}: the model's weights changed since the suite was read; run again")
        model = DefendedModel(self.defense(cell).preprocess(), classifier).to(self.settings.device)
        model = model.eval().requires_grad_(False)
        test = self.data(cell.dataset).test
        correct = (predict(model, test.x) == test.y).float()
        return model, {"test_acc": round(float(correct.mean()), 4), "user_model": True, "cached": False}

    def _load_or_train(self, cell: Cell) -> tuple[nn.Module, dict[str, Any]]:
        if cell.model is not None:
            return self._user_classifier(cell)
        defense = self.defense(cell)
        if defense.shares_weights_with_none:
            undefended, facts = self._trained(replace(cell, defense="none", defense_values={}))
            model = defense.build()
            model.classifier.load_state_dict(undefended.classifier.state_dict())
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
                    desc=f"train {cell.dataset.value} {defense.id}", should_stop=self.stop.is_set,
                    checkpoint=self.cache.partial(cell.dataset.value, self.model_label(cell),
                                                  self.model_fields(cell)))
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

    # --- black-box substitutes --------------------------------------------------------------------------------
    def holdout(self, cell: Cell) -> torch.Tensor:
        """The attacker's images: a seeded sample of test images disjoint from the evaluated ones."""
        index, _, _ = self.eval_set(cell)
        test = self.data(cell.dataset).test
        free = torch.ones(len(test), dtype=torch.bool)
        free[index] = False
        candidates = free.nonzero().flatten()
        size = cell.threat_params["holdout"]
        if len(candidates) < size:
            raise BenchError(f"blackbox needs {size} test images disjoint from the {cell.n} evaluated ones, only "
                             f"{len(candidates)} are left; lower n or blackbox.holdout")
        pick = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(cell.seed))[:size]
        return test.x[candidates[pick.sort().values]]

    def oracle_cell(self, cell: Cell) -> Cell:
        """Whose labels train the substitute: the target itself, or the undefended model (shared substitute)."""
        if cell.threat_params["oracle"] == "undefended":
            return replace(cell, defense="none", defense_values={})
        return cell

    def substitute_fields(self, cell: Cell) -> dict[str, Any]:
        """The substitute's cache key: the oracle's weights *and* its whole defense (defenses that share weights,
        like feature squeezing, still label differently), the black-box settings and the holdout."""
        oracle = self.oracle_cell(cell)
        return {"kind": "substitute", "oracle": self.model_fields(oracle), "oracle_defense": self.defense(oracle).id,
                "blackbox": cell.threat_params, "n": cell.n, "sample": cell.sample, "seed": cell.seed,
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
                                                  cell.dataset.shape, cell.threat_params, cell.seed,
                                                  self.settings.device)
                model.load_state_dict(trained.state_dict())
                return facts

            model, facts = self.cache.get_or_train(cell.dataset.value, self.substitute_label(cell), fields,
                                                   lambda: SubstituteCNN(cell.dataset.shape), train)
            return model.to(self.settings.device).eval().requires_grad_(False), facts

        return self._cached(("substitute", repr(fields)), make)

    # --- artifacts (what executors train ahead, what --fresh forgets) -----------------------------------------
    def artifact(self, kind: str, cell: Cell) -> tuple[str, dict[str, Any]]:
        """(cache label, cache fields) of a ``"model"`` or ``"substitute"``."""
        if kind == "substitute":
            return self.substitute_label(cell), self.substitute_fields(cell)
        return self.model_label(cell), self.model_fields(cell)

    def load(self, kind: str, cell: Cell) -> None:
        """Train (or load) an artifact."""
        if kind == "substitute":
            self.substitute(cell)
        else:
            self.model(cell)
