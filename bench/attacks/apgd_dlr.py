"""APGD-DLR / APGD-T adapter (torchattacks.APGD on the DLR loss, torchattacks.APGDT)."""

from __future__ import annotations

import torch
import torchattacks
from torch import nn

from bench.attacks import _torchattacks as ta
from bench.attacks.base import REGISTRY, Attack


@REGISTRY.register
class APGDDLR(Attack):
    """Auto-PGD on the DLR loss, L∞: untargeted, or APGD-T over the k likeliest other classes (Croce & Hein, ICML 2020).

    The Difference of Logits Ratio −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3) (π: logits sorted, largest first) is the
    logit margin divided by the spread of the top logits, so rescaling the logits, which defeats cross-entropy
    attacks on saturated softmaxes, does not change it. ``targets`` = 0: untargeted (torchattacks.APGD, loss
    "dlr"; AutoAttack's apgd-dlr in its plus and rand versions). ``targets`` = k ≥ 1: APGD-T (torchattacks.APGDT):
    one run per target t, the t-th most likely other class on the clean image, on the targeted DLR loss
    −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2), each run only on the images not fooled yet (AutoAttack's standard
    version: 9 targets, 1 restart each). Either way the goal is any misclassification and the record is
    untargeted, so there is no ``target`` parameter. Step-size schedule and defaults as ``apgd_ce`` (AutoAttack's:
    100 steps, 1 restart per target, rho 0.75, eot 1); torchattacks 3.5.1 matches fra31/auto-attack's APGDAttack
    and APGDAttack_targeted at the same seed (identical robust accuracy on a 1-epoch MNIST CNN, 64 images, eps 0.1
    and 0.3; outputs within 0.002, where float rounding of the loss tipped a step). Seeds are drawn from the cell's
    torch RNG. Against a zero input Jacobian (a rounding defense, white-box, step savings on) the steps are skipped
    as in ``apgd_ce``.
    Example: ``{ name = "apgd_dlr", eps = [0.1, 0.3], targets = 9 }``.
    """

    name = "apgd_dlr"
    check_convergence = True
    params = (*ta.APGD_PARAMS, ta.targets_param("untargeted APGD-DLR", "APGD-T"))

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        common = {"norm": "Linf", "eps": eps, "steps": v["steps"], "n_restarts": v["restarts"], "seed": ta.seed(),
                  "eot_iter": v["eot"], "rho": v["rho"]}
        if self.runtime.early_stop and v["eot"] == 1:
            frozen = ta.apgd_frozen(model, x, y, eps, common["seed"], runs=v["restarts"] * max(1, v["targets"]))
            if frozen is not None:
                return frozen
        if v["targets"]:
            attack = torchattacks.APGDT(model, n_classes=ta.N_CLASSES, **common)
            attack.n_target_classes = v["targets"]  # torchattacks takes all n_classes − 1 unless told otherwise
        else:
            attack = torchattacks.APGD(model, loss="dlr", **common)
        return ta.call(attack, model, x, y)
