"""What the adapters over torchattacks' AutoAttack family (APGD, APGD-T, FAB) share: seeds, the call, parameters."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bench.registry import Param

N_CLASSES = 10  # MNIST and CIFAR-10; torchattacks' APGDT and FAB want it up front

APGD_PARAMS = (
    Param("steps", int, 100, "iterations per restart (and per target)", low=1),
    Param("restarts", int, 1, "runs from fresh random starts, each on the images not fooled yet", low=1),
    Param("eot", int, 1, "gradients averaged per step (Expectation over Transformation, for randomized models)",
          low=1),
    Param("rho", float, 0.75, "step-size check: halve where fewer than this fraction of the steps since the last "
          "checkpoint raised the loss", positive=True, high=1.0),
)


def targets_param(untargeted: str, targeted: str) -> Param:
    """``targets``: 0 untargeted, k ≥ 1 one run per each of the k most likely other classes (the -T variants)."""
    return Param("targets", int, 0, f"0: {untargeted}; k ≥ 1: {targeted}, one run per each of the k most likely "
                 "other classes on the clean image (the goal stays any misclassification)", low=0, high=N_CLASSES - 1)


def seed() -> int:
    """A seed for a torchattacks attack that reseeds the global torch RNG with its ``seed`` argument.

    Drawn from the torch RNG, which the runner seeds per cell, so results follow the cell seed (and each batch
    and each component of an ensemble gets its own).
    """
    return int(torch.randint(2**31, ()))


@contextmanager
def training_flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag of ``model`` on exit."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def call(attack: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``attack(x, y)``, leaving the modules of ``model`` in the training mode they were in.

    torchattacks' ``Attack.__call__`` sets eval mode, attacks, and then calls ``model.train()`` whenever the
    top-level module was in training mode. The runner passes the defended model wrapped in ``CountingModel``, a
    new ``nn.Module`` and so in training mode while the model inside is in eval mode: the plain call leaves the
    defended model in training mode (measured: ``training`` False before one torchattacks.APGD call, True after),
    where CQ's ``hard`` steps turn back into sigmoids for whatever runs on it next.
    """
    with training_flags_kept(model):
        return attack(x, y).detach()  # APGD's result is still attached to the graph of its last step
