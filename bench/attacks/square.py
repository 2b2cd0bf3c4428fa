"""Square Attack adapter (torchattacks)."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from bench.attacks.base import REGISTRY, Attack, target_param
from bench.registry import Param


@REGISTRY.register
class Square(Attack):
    """Square Attack, L∞, score-based and gradient-free (Andriushchenko et al., ECCV 2020; torchattacks.Square).

    Random search over square patches of ±eps on the margin loss. Defaults: 1,000 queries per image and restart
    (torchattacks and AutoAttack use 5,000; 1,000 keeps a CPU cell affordable), p_init 0.8 (torchattacks' and
    AutoAttack's default), 1 restart. torchattacks reseeds the torch RNG with its ``seed`` argument on every call;
    the adapter draws that seed from the torch RNG, which the runner seeds per cell. Images it does not fool come
    back unchanged. Example: ``{ name = "square", eps = [0.1, 0.3], queries = 5000 }``.
    """

    name = "square"
    gradient = False
    params = (
        Param("queries", int, 1000, "queries per image and restart", low=1),
        Param("p_init", float, 0.8, "initial fraction of pixels in a square", positive=True, high=1.0),
        Param("restarts", int, 1, "runs, each on the images not fooled yet", low=1),
        target_param(),
    )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        attack = torchattacks.Square(model, norm="Linf", eps=eps, n_queries=v["queries"], n_restarts=v["restarts"],
                                     p_init=v["p_init"], loss="margin", seed=int(torch.randint(2**31, ())))
        return self.torchattacks_call(attack, x, y, target)

    def passes(self) -> tuple[float, float]:
        return float(self.values["queries"] * self.values["restarts"]), 0.0
