"""BIM adapter: torchattacks' BIM update in the harness's step loop."""

from __future__ import annotations

import torch
from torch import nn

from bench.attacks._steps import iterate
from bench.attacks.base import REGISTRY, Attack, target_param
from bench.registry import Param


@REGISTRY.register
class BIM(Attack):
    """Basic Iterative Method (iterative FGSM), L∞ (Kurakin et al., ICLR 2017 workshop; torchattacks.BIM's update
    in the harness's step loop, :mod:`bench.attacks._steps`).

    No random start. Defaults: 10 steps of size ``step_size``·eps/steps with step_size 2.5, i.e. eps/4 per step
    (torchattacks' own ratio, 2/255 at eps 8/255; the 2.5·eps path length is the Madry-lab practice ``pgd`` uses
    too), so the step scales with every eps of the grid. Example: ``{ name = "bim", eps = [0.1, 0.3] }``.
    """

    name = "bim"
    revision = 1  # 1: the harness's step loop (first adversarial iterate kept)
    pooled = True
    params = (
        Param("steps", int, 10, "iterations", low=1),
        Param("step_size", float, 2.5, "step size as a multiple of eps/steps (alpha = step_size·eps/steps)",
              positive=True, high=100.0),
        target_param(),
    )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        steps = self.values["steps"]
        adv, self.stats = iterate(model, x, y, target, eps=eps, alpha=self.values["step_size"] * eps / steps,
                                  steps=steps, random_start=False, restarts=1, runtime=self.runtime)
        return adv
