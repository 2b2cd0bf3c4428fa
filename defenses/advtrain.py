"""PGD adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
Adversarial Attacks", ICLR 2018) of the plain CNN, and the PGD batch helper DQA shares."""

from __future__ import annotations

from typing import Any

import torch
import torchattacks
from torch import nn

from bench.registry import Param, PerDataset
from defenses.base import REGISTRY, Defense

# Madry et al.'s training attacks: MNIST eps 0.3, 40 steps of 0.01; CIFAR-10 eps 8/255, 7 steps of 2/255.
MADRY_EPS = PerDataset(mnist=0.3, cifar10=8 / 255)
MADRY_STEPS = PerDataset(mnist=40, cifar10=7)
MADRY_STEP_SIZE = PerDataset(mnist=0.01, cifar10=2 / 255)
# Measured here: PGD-40 training at eps 0.3 from the first batch (Adam 1e-3) stayed at loss 2.30 for 300 batches.
WARMUP = PerDataset(mnist=0.2, cifar10=0.0)


def pgd_params(prefix: str = "", in_id: bool = False) -> tuple[Param, ...]:
    """The training attack's eps, steps and step size, with Madry et al.'s defaults; names start with ``prefix``."""
    return (
        Param(f"{prefix}eps", float, MADRY_EPS, "L∞ radius of the training PGD (Madry: 0.3 MNIST, 8/255 CIFAR-10)",
              positive=True, high=1.0, in_id=in_id),
        Param(f"{prefix}steps", int, MADRY_STEPS, "PGD steps per training batch (Madry: 40 MNIST, 7 CIFAR-10)", low=1),
        Param(f"{prefix}step_size", float, MADRY_STEP_SIZE, "PGD step size (Madry: 0.01 MNIST, 2/255 CIFAR-10)",
              positive=True, high=1.0),
        Param(f"{prefix}warmup", float, WARMUP, "fraction of training over which eps and step size ramp up linearly "
              "from 0 (not in Madry et al.; avoids the 2.30-loss plateau of short MNIST schedules with Adam 1e-3)",
              low=0.0, high=1.0),
    )


EPOCHS = Param("epochs", int, 0, "training epochs; 0: the suite's dataset epochs (adversarial training costs "
               "steps + 1 passes per batch, so a suite may train it shorter)", low=0)


def epochs_override(values: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": values["epochs"]} if values["epochs"] else {}


def pgd_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, values: dict[str, Any], prefix: str,
              progress: float) -> torch.Tensor:
    """PGD examples (torchattacks.PGD, random start from the global torch RNG) against ``model`` kept in training
    mode, so that training-time gradients (e.g. a straight-through estimator) are the ones followed. During the
    warm-up (the first ``warmup`` fraction of training) eps and step size grow linearly from 0."""
    warmup = values[f"{prefix}warmup"]
    scale = min(1.0, progress / warmup) if warmup > 0 else 1.0
    if scale == 0:
        return x
    attack = torchattacks.PGD(model, eps=scale * values[f"{prefix}eps"], alpha=scale * values[f"{prefix}step_size"],
                              steps=values[f"{prefix}steps"], random_start=True)
    attack.set_model_training_mode(model_training=True)
    return attack(x, y).detach()


@REGISTRY.register
class AdversarialTraining(Defense):
    """PGD adversarial training: each training batch is replaced by PGD examples against the model being trained.

    Madry et al. (ICLR 2018), L∞: eps 0.3, 40 steps of 0.01 on MNIST; eps 8/255, 7 steps of 2/255 on CIFAR-10
    (the paper's settings), random start, batches replaced (not mixed) by adversarial ones as in the paper; on
    MNIST eps ramps up over the first 20 % of training (``warmup``; Madry et al. train 100k steps at full eps). No
    preprocessing, ReLU CNN, fully differentiable: ``bpda`` equals ``whitebox``. Every batch costs steps + 1
    forward/backward passes, so ``epochs`` can shorten training below the suite's dataset epochs.
    """

    name = "advtrain"
    params = (*pgd_params(in_id=True), EPOCHS)

    def training_overrides(self) -> dict[str, Any]:
        return epochs_override(self.values)

    def training_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return pgd_batch(model, x, y, self.values, "", progress), y
