"""What the adapters over torchattacks' AutoAttack family (APGD, APGD-T, FAB) share: seeds, the call, parameters,
and the runs they can skip.

Against a model whose input Jacobian is exactly zero (a rounding defense such as bit-depth squeezing or DQA,
white-box) these attacks cannot move: APGD's first step from its random start is ``sign(0) = 0`` and its momentum
starts at zero, so every iterate is the start; FAB projects onto a linearised boundary whose normal is zero, gets
a zero step and stays at the clean image. torchattacks would still take every step (AutoAttack white-box on the
PGD-trained DQA: 1.86 million gradient steps, 4,158 s on one core, for what Square alone decided). Written by
hand because torchattacks has no such exit: :func:`apgd_frozen` and :func:`fab_frozen` return what the attack
would return (the same seed, the same random starts from the same RNG calls, the global RNG left as the attack
leaves it; APGD's projection moves its iterate by float rounding only, so an image's point may differ from the
attack's by that, never its verdict), for one forward and backward pass per run, and None, after at most that,
where the Jacobian is not zero at every point the attack would start from (the caller then runs the attack).
"""

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


def frozen(model: nn.Module, points: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(per point: the model's whole input Jacobian is zero there, the logits). Tested on the gradient of a random
    Gaussian combination of the logits: exactly zero wherever the Jacobian is, and, where it is not, zero only
    with probability 0. A model whose logits carry no graph at all counts as not frozen (the attack decides)."""
    points = points.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(points)
        if not logits.requires_grad:
            return torch.zeros(len(points), dtype=torch.bool, device=points.device), logits.detach()
        weights = torch.randn(logits.shape, generator=generator).to(logits.device)
        (grad,) = torch.autograd.grad((logits * weights).sum(), points)
    return (grad.flatten(1) == 0).all(1), logits.detach()


def apgd_frozen(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int,
                runs: int) -> torch.Tensor | None:
    """torchattacks.APGD's or APGDT's L∞ output (``runs``: restarts, times targets for APGD-T) where the model's
    Jacobian is zero at every random start: each run draws the starts of the images not fooled yet exactly as
    ``attack_single_run`` does, and an image keeps the first start the model misclassifies. None where a start
    (or, checked first, the first clean image) has a non-zero Jacobian."""
    generator = torch.Generator().manual_seed(seed)
    if not frozen(model, x[:1], generator)[0].all():
        return None
    with torch.no_grad():
        standing = model(x).max(1)[1] == y
    adv = x.clone()
    torch.manual_seed(seed)  # as APGD.perturb / APGDT.perturb
    for _ in range(runs):
        ind = standing.nonzero().flatten()
        if not len(ind):
            continue
        xs = x[ind]
        t = 2 * torch.rand(xs.shape).to(x.device).detach() - 1
        start = (xs + eps * torch.ones([xs.shape[0], 1, 1, 1]).to(x.device) * t
                 / t.reshape([t.shape[0], -1]).abs().max(dim=1, keepdim=True)[0].reshape([-1, 1, 1, 1])).clamp(0.0, 1.0)
        stuck, logits = frozen(model, start, generator)
        if not stuck.all():
            return None
        fooled = logits.max(1)[1] != y[ind]
        standing[ind[fooled]] = False
        adv[ind[fooled]] = start[fooled]
    return adv


def fab_frozen(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor | None:
    """torchattacks.FAB's output with one restart (no random start) where the model's Jacobian is zero at every
    clean image: the images themselves. None otherwise (checked on the first image first)."""
    generator = torch.Generator().manual_seed(seed)
    if not frozen(model, x[:1], generator)[0].all() or (len(x) > 1 and not frozen(model, x[1:], generator)[0].all()):
        return None
    torch.manual_seed(seed)  # as FAB.perturb
    return x.clone()


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
