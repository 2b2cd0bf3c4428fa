"""HopSkipJump adapter (ART HopSkipJump)."""

from __future__ import annotations

import numpy as np
import torch
from art.attacks.evasion.hop_skip_jump import HopSkipJump
from torch import nn

from bench.attacks import _art
from bench.attacks.base import REGISTRY, Attack, target_param
from bench.registry import Param


@REGISTRY.register
class HSJA(Attack):
    """HopSkipJump, decision-based and gradient-free (Chen, Jordan & Wainwright, IEEE S&P 2020; ART HopSkipJump).

    Binary searches to the boundary and gradient estimates from predicted labels only. It runs as the
    minimum-norm attack it is (``norm``: the distance it minimises); the harness then projects the result into
    the suite's L∞ eps ball, so the class ``norm`` trait is ``linf`` and the cells compare with the other L∞
    attacks at the same eps. ``norm`` defaults to ``linf`` for that reason: an L2-minimal perturbation loses more
    to the L∞ projection (1-epoch MNIST CNN, eps 0.3, 8 images: success 1.00 with linf, 0.88 with l2).
    max_iter 20, max_eval 1,000, init_eval 100 (ART: 50, 10,000, 100): about 6,000 queries per image.
    Each image starts from the nearest image of its batch that the model already puts in another class
    (untargeted) or in the target class (targeted): the paper's targeted initialisation, and deterministic,
    unlike ART's unseeded random search. Images without such a neighbour, and images already misclassified, come
    back unchanged. numpy's RNG is seeded from the cell's torch RNG.
    Example: ``{ name = "hsja", eps = [0.1, 0.3], norm = "l2", max_iter = 50 }``.
    """

    name = "hsja"
    norm = "linf"
    gradient = False
    params = (
        Param("norm", str, "linf", "distance HSJA minimises before the harness projects into the L∞ eps ball",
              choices=("l2", "linf")),
        Param("max_iter", int, 20, "iterations per image", low=1),
        Param("max_eval", int, 1000, "largest number of queries of one gradient estimate", low=1),
        Param("init_eval", int, 100, "queries of the first gradient estimate (at most max_eval)", low=1),
        target_param(),
    )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        v = self.values
        if v["init_eval"] > v["max_eval"]:
            raise ValueError(f"hsja: init_eval ({v['init_eval']}) must not exceed max_eval ({v['max_eval']})")
        with torch.inference_mode():
            pred = model(x).argmax(1)
        if target is None:
            todo, start_ok = pred == y, pred[None, :] != pred[:, None]
        else:
            todo, start_ok = pred != target, pred[None, :] == target[:, None]
        flat = x.flatten(1)
        nearest = torch.cdist(flat, flat).masked_fill(~start_ok, torch.inf).argmin(1)
        todo &= start_ok.any(1)
        adv = x.clone()
        if not todo.any():
            return adv
        attack = HopSkipJump(_art.classifier(model, x), batch_size=v["max_eval"], targeted=target is not None,
                             norm=2 if v["norm"] == "l2" else np.inf, max_iter=v["max_iter"], max_eval=v["max_eval"],
                             init_eval=v["init_eval"], verbose=False)
        labels = pred if target is None else target
        with _art.numpy_seeded():
            adv[todo] = _art.to_tensor(attack.generate(_art.to_numpy(x[todo]), y=labels[todo].cpu().numpy(),
                                                       x_adv_init=_art.to_numpy(x[nearest[todo]])), x)
        return adv

    def passes(self) -> tuple[float, float]:
        return float(self.values["max_iter"] * (self.values["max_eval"] + 25)), 0.0  # + ~25 binary-search queries
