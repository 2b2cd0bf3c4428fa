"""The small base class every defense derives from, and the defense registry.

A defense contributes a preprocessing module in front of the Cleverhans CNN and/or the activations inside it,
plus optional training hooks (a loss, a batch transform such as noise or adversarial examples, a projection after
each optimiser step). The harness trains the defended network as one model, caches it, and hands it to attacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bench.models import ActivationFactory, CleverhansCNN, DefendedModel
from bench.registry import Component, Registry
from bench.types import Dataset


class Defense(Component):
    """Base: identity preprocessing, ReLU activations, plain training.

    ``bpda_variants`` names the backward approximations the ``bpda`` threat can use on this defense (see
    :mod:`bench.bpda`); empty means the defense has nothing to approximate, so ``bpda`` equals ``whitebox``.
    ``shares_weights_with_none`` marks defenses applied to the undefended model without retraining.
    ``untrusted`` marks code the harness did not write (``custom``): ``bpda`` chooses its backward pass and EOT from
    the model probe, and :meth:`check_output` runs before any cell.
    """

    bpda_variants: ClassVar[tuple[str, ...]] = ()
    shares_weights_with_none: ClassVar[bool] = False
    untrusted: ClassVar[bool] = False

    def __init__(self, dataset: Dataset, values: dict[str, Any]) -> None:
        self.dataset = dataset
        self.values = values

    @property
    def id(self) -> str:
        return self.make_id(self.values, self.dataset)

    def preprocess(self) -> nn.Module:
        return nn.Identity()

    def activation(self) -> ActivationFactory:
        return nn.ReLU

    def build(self) -> DefendedModel:
        """A fresh, untrained defended model."""
        return DefendedModel(self.preprocess(), CleverhansCNN(self.dataset.shape, activation=self.activation()))

    def _training_values(self) -> dict[str, Any]:
        return {p.name: self.values[p.name] for p in self.params if not p.inference_only}

    def weights_key(self) -> dict[str, Any]:
        """Everything about the defense that changes the trained weights (part of the model cache key)."""
        if self.shares_weights_with_none:
            return {"defense": "none"}
        return {"defense": self.name,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self._training_values().items()}}

    def trains(self) -> bool:
        """True when the defense needs weights of its own (it cannot sit in front of a user's trained model)."""
        return self.weights_key() != {"defense": "none"}

    @classmethod
    def prepare(cls, entry: dict[str, Any], given: dict[str, Any], source: str, path: str,
                base: Path | None) -> dict[str, Any]:
        """The parameters of one expanded suite entry, completed by the defense (e.g. ``custom`` adds its module's
        hash); ``entry`` is the raw table, ``base`` the suite file's folder. Raise a SuiteError for bad input."""
        return given

    def check_output(self, x: torch.Tensor) -> None:
        """Raise a BenchError before any cell runs when the preprocessing is unusable on images ``x``."""

    def weights_label(self) -> str:
        """Readable name of the trained weights in the model cache (``none`` for defenses that share them)."""
        return "none" if self.shares_weights_with_none else self.make_id(self._training_values(), self.dataset)

    def training_overrides(self) -> dict[str, Any]:
        """Training settings this defense imposes over the suite's (e.g. ``{"loss": "mse"}``)."""
        return {}

    def training_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform one training batch (data augmentation, adversarial examples); identity by default.
        ``progress`` is the fraction of training steps already done (for schedules such as an eps warm-up)."""
        return x, y

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (e.g. keep learned thresholds sorted in [0, 1])."""

    def monotone_preprocess(self) -> bool:
        """True when :meth:`preprocess` maps each pixel on its own by a continuous, increasing function and has an
        ``inverse(v, lo, hi)`` method: the ``quantized`` threat then attacks the classifier on the exact set of
        preprocessed inputs an eps ball reaches (:mod:`bench.threats.quantized`)."""
        return False

    def detector(self, model: nn.Module, train_x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A detector flagging adversarial inputs (bool per image), or None when the defense does not detect."""
        return None

    def plots(self, model: nn.Module, out_dir: Path, dataset_title: str) -> list[Path]:
        """Figures about the trained defense written into ``out_dir`` (e.g. learned thresholds); ``dataset_title``
        names the dataset in a figure title, marked when its files are not the official release."""
        return []


REGISTRY: Registry[Defense] = Registry("defense", Defense, "defenses", "qusec_bench.defenses")
