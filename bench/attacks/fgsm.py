"""FGSM adapter (torchattacks)."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from bench.attacks.base import REGISTRY, Attack, target_param


@REGISTRY.register
class FGSM(Attack):
    """Fast Gradient Sign Method, L∞, one step of size eps (Goodfellow et al., ICLR 2015; torchattacks.FGSM).

    Defaults: untargeted. Example suite entry: ``{ name = "fgsm", eps = [0.1, 0.3], threat = ["whitebox"] }``.
    """

    name = "fgsm"
    iterative = False
    params = (target_param(),)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        return self.torchattacks_call(torchattacks.FGSM(model, eps=eps), x, y, target)
