"""PGD adapter (torchattacks) with per-sample worst case over random restarts."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from bench.attacks.base import REGISTRY, Attack, target_param
from bench.registry import Param


@REGISTRY.register
class PGD(Attack):
    """Projected Gradient Descent, L∞, from a uniform random start (Madry et al., ICLR 2018; torchattacks.PGD).

    Defaults: 40 steps (Madry et al.'s MNIST setting) of size ``step_size``·eps/steps with step_size 2.5 (the
    Madry-lab robustness library's rule: the path is 2.5·eps long, enough to cross the ball from a random start,
    for every eps and for the doubled steps of the convergence check); 1 restart. With ``restarts`` > 1 each
    further run starts afresh only on the images not yet fooled (one extra forward pass per run decides which),
    and an image keeps the first adversarial example found for it (AutoAttack's per-sample worst case).
    Example: ``{ name = "pgd", eps = [0.1, 0.3], steps = 100, restarts = 5 }``.
    """

    name = "pgd"
    check_convergence = True
    params = (
        Param("steps", int, 40, "iterations", low=1),
        Param("step_size", float, 2.5, "step size as a multiple of eps/steps (alpha = step_size·eps/steps)",
              positive=True, high=100.0),
        Param("random_start", bool, True, "start from a uniform random point of the eps ball"),
        Param("restarts", int, 1, "runs from fresh random starts, each on the images not fooled yet", low=1),
        target_param(),
    )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        attack = torchattacks.PGD(model, eps=eps, alpha=v["step_size"] * eps / v["steps"], steps=v["steps"],
                                  random_start=v["random_start"])
        adv = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for run in range(v["restarts"]):
            goal = None if target is None else target[todo]
            adv[todo] = self.torchattacks_call(attack, x[todo], y[todo], goal)
            if run + 1 == v["restarts"]:
                break
            with torch.inference_mode():
                pred = model(adv[todo]).argmax(1)
            todo = todo[pred == y[todo] if goal is None else pred != goal]
            if not len(todo):
                break
        return adv
