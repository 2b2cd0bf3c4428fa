"""APGD-CE adapter (torchattacks.APGD on the cross-entropy loss)."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from bench.attacks import _torchattacks as ta
from bench.attacks.base import REGISTRY, Attack


@REGISTRY.register
class APGDCE(Attack):
    """Auto-PGD on the cross-entropy loss, L∞, AutoAttack's first attack (Croce & Hein, ICML 2020; torchattacks.APGD).

    PGD with momentum 0.75 from a uniform random start, step size 2·eps at first, halved per image at checkpoints
    (after 22 % of the steps, then at intervals shrinking by 3 % to 6 %) where fewer than ``rho`` of the steps
    since the last checkpoint raised the loss or the best loss did not improve; the image then resumes from its
    best point. Defaults are AutoAttack's (fra31/auto-attack): 100 steps, 1 restart, rho 0.75, eot 1 (its
    ``rand`` version uses 20 against randomized defenses). Only images the model classifies correctly are
    attacked; each restart runs on those not fooled yet, and a fooled image keeps the last iterate the model
    misclassified. With the harness's step savings on a deterministic model whose input Jacobian is exactly zero
    at every start (a rounding defense, white-box), no step could move an image, and the adapter returns the
    misclassified starts without taking the steps (``bench.attacks._torchattacks``). torchattacks 3.5.1
    reproduces the reference APGDAttack bit for bit here (same seed, 1-epoch MNIST CNN, 64 images, eps 0.1 and
    0.3). torchattacks reseeds the torch RNG with its ``seed`` argument; the
    adapter draws it from the torch RNG, which the runner seeds per cell. L∞ only: the harness projects with the
    class's ``norm``, so APGD-L2 would be an adapter of its own.
    Example: ``{ name = "apgd_ce", eps = [0.1, 0.3], restarts = 5 }``.
    """

    name = "apgd_ce"
    check_convergence = True
    params = ta.APGD_PARAMS

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        seed = ta.seed()
        if self.runtime.early_stop and v["eot"] == 1:
            frozen = ta.apgd_frozen(model, x, y, eps, seed, runs=v["restarts"])
            if frozen is not None:
                return frozen
        attack = torchattacks.APGD(model, norm="Linf", eps=eps, steps=v["steps"], n_restarts=v["restarts"],
                                   seed=seed, loss="ce", eot_iter=v["eot"], rho=v["rho"])
        return ta.call(attack, model, x, y)
