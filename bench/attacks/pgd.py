"""PGD adapter: torchattacks' PGD update in the harness's step loop, with random restarts on the survivors."""

from __future__ import annotations

import torch
from torch import nn

from bench.attacks._steps import iterate
from bench.attacks.base import REGISTRY, Attack, target_param
from bench.registry import Param


@REGISTRY.register
class PGD(Attack):
    """Projected Gradient Descent, L∞, from a uniform random start (Madry et al., ICLR 2018; torchattacks.PGD's
    update in the harness's step loop, :mod:`bench.attacks._steps`).

    Defaults: 40 steps (Madry et al.'s MNIST setting) of size ``step_size``·eps/steps with step_size 2.5 (the
    Madry-lab robustness library's rule: the path is 2.5·eps long, enough to cross the ball from a random start,
    for every eps and for the doubled steps of the convergence check); 1 restart. With ``restarts`` > 1 each
    further run starts afresh only on the images not yet fooled, and an image keeps the first adversarial example
    found for it (AutoAttack's per-sample worst case). ``step_schedule = "linear"`` lets the step fall from alpha to
    alpha/steps. Example: ``{ name = "pgd", eps = [0.1, 0.3], steps = 100, restarts = 5 }``.
    """

    name = "pgd"
    revision = 1  # 1: the harness's step loop (first adversarial iterate kept)
    check_convergence = True
    pooled = True
    params = (
        Param("steps", int, 40, "iterations", low=1),
        Param("step_size", float, 2.5, "step size as a multiple of eps/steps (alpha = step_size·eps/steps)",
              positive=True, high=100.0),
        Param("random_start", bool, True, "start from a uniform random point of the eps ball"),
        Param("restarts", int, 1, "runs from fresh random starts, each on the images not fooled yet", low=1),
        Param("step_schedule", str, "constant", "constant: every step alpha; linear: step t has alpha·(1 − t/steps), "
              "large moves first, then refinement (with step_size = steps the first step is eps; it finds what the "
              "constant step misses through BPDA and in the quantized space, README 'Threat models')",
              choices=("constant", "linear"), keyed_at_default=False),
        target_param(),
    )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        adv, self.stats = iterate(model, x, y, target, eps=eps, alpha=v["step_size"] * eps / v["steps"],
                                  steps=v["steps"], random_start=v["random_start"], restarts=v["restarts"],
                                  runtime=self.runtime, decay=v["step_schedule"] == "linear")
        return adv
