"""FAB / FAB-T adapter (torchattacks.FAB)."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from bench.attacks import _torchattacks as ta
from bench.attacks.base import REGISTRY, Attack
from bench.registry import Param


@REGISTRY.register
class FAB(Attack):
    """Fast Adaptive Boundary attack, L∞ within eps, untargeted or top-k targeted (FAB-T) (Croce & Hein, ICML 2020).

    A minimum-norm attack (torchattacks.FAB): each step projects onto the linearised decision boundary of the
    closest other class, biased towards the original image (alpha_max 0.1, overshoot eta 1.05, and a step back by
    beta 0.9 after each success). An image keeps its smallest adversarial point and comes back unchanged when
    that is farther than eps in L∞, so the result lies in the ball (AutoAttack's use of FAB). ``targets`` = 0:
    untargeted, one backward pass per class per step (the Jacobian); ``targets`` = k ≥ 1: FAB-T, one run per
    each of the k most likely other classes on the clean image, one backward pass per step, each run only on the
    images not fooled yet. The goal stays any misclassification (no ``target`` parameter). Restarts after the
    first start at random points halfway into the ball. Defaults are AutoAttack's (fra31/auto-attack): 100 steps,
    1 restart (its standard version runs FAB-T with 9 targets; plus adds untargeted FAB with 5 restarts);
    torchattacks 3.5.1 reproduces the reference FAB-T bit for bit (same seed, 1-epoch MNIST CNN, 64 images, eps
    0.1 and 0.3). Seeds are drawn from the cell's torch RNG. With one restart and the step savings on, a
    deterministic model whose input Jacobian is exactly zero at every image (a rounding defense, white-box) gets
    the images back without FAB's steps, which would not move them (``bench.attacks._torchattacks``).
    Example: ``{ name = "fab", eps = [0.1, 0.3], targets = 9 }``.
    """

    name = "fab"
    check_convergence = True
    params = (
        Param("steps", int, 100, "iterations per restart (and per target)", low=1),
        Param("restarts", int, 1, "runs, each on the images not fooled yet; the later ones from random starts", low=1),
        ta.targets_param("untargeted FAB", "FAB-T"),
    )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        seed = ta.seed()
        if self.runtime.early_stop and v["restarts"] == 1:
            frozen = ta.fab_frozen(model, x, seed)
            if frozen is not None:
                return frozen
        attack = torchattacks.FAB(model, norm="Linf", eps=eps, steps=v["steps"], n_restarts=v["restarts"],
                                  seed=seed, multi_targeted=v["targets"] > 0, n_classes=ta.N_CLASSES)
        if v["targets"]:
            attack.n_target_classes = v["targets"]  # torchattacks takes all n_classes − 1 unless told otherwise
        return ta.call(attack, model, x, y)
