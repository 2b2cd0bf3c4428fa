"""Quantized activations (Rakin, Yi, Gong & Fan, "Defend Deep Neural Networks Against Adversarial Examples via Fixed
and Dynamic Quantized Activation Functions", arXiv:1807.06714, 2018): fixed (FQA) and dynamic (DQA) thresholds.

Written by hand: no attack/defense library (torchattacks, ART) ships quantized activation functions.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from bench.models import ActivationFactory
from bench.registry import Param
from defenses.advtrain import EPOCHS, epochs_override, pgd_batch, pgd_params
from defenses.base import REGISTRY, Defense


class QuantizedActivation(nn.Module):
    """y = 1/(L−1) · Σ_k [x > t_k]: 2^bits = L output levels k/(L−1) on [0, 1], thresholds t_1 ≤ … ≤ t_{L−1}.

    Fixed: t_k = (k − ½)/(L−1), round-to-nearest of clip(x, 0, 1). Dynamic: the same values initialise one
    trainable threshold vector per activation layer (kept sorted in [0, 1] by :meth:`project_`).

    Backward. Training mode: straight-through estimator, the gradient of the clipped identity, dy/dx = 1 on [0, 1]
    and 0 outside, and for dynamic thresholds dy/dt_k = −1 where x lies in the k-th level interval
    [(k−1)/(L−1), k/(L−1)] (the step that t_k controls). Eval mode (the deployed model, as attacks see it): the
    exact derivative of the forward pass, zero almost everywhere. :meth:`bpda_approx` restores the training STE.
    """

    def __init__(self, bits: int, dynamic: bool) -> None:
        super().__init__()
        levels = 2 ** bits
        thresholds = (torch.arange(1, levels, dtype=torch.float32) - 0.5) / (levels - 1)
        if dynamic:
            self.thresholds = nn.Parameter(thresholds)
        else:
            self.register_buffer("thresholds", thresholds)

    @property
    def steps(self) -> int:
        return self.thresholds.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hard = (x.unsqueeze(-1) > self.thresholds.detach()).sum(-1).to(x.dtype) / self.steps
        if not self.training:
            return hard + x * 0  # the true (zero) gradient, still connected so attacks get zeros, not an error
        clipped = x.clamp(0.0, 1.0)
        interval = (clipped.detach() * self.steps).floor().long().clamp(max=self.steps - 1)
        inside = ((x >= 0) & (x <= 1)).to(x.dtype)
        # t[interval] as a masked sum, not an index: the backward of an index into 3 thresholds is one atomic add
        # per activation into the same 3 addresses, which serialises on a GPU; the sum's backward is a reduction.
        chosen = (interval.unsqueeze(-1) == torch.arange(self.steps, device=x.device)) * self.thresholds
        surrogate = clipped - chosen.sum(-1) * inside
        return (surrogate - surrogate.detach()) + hard

    @torch.no_grad()
    def project_(self) -> None:
        self.thresholds.copy_(self.thresholds.clamp(0.0, 1.0).sort().values)

    def bpda_approx(self, backward: str, z: float) -> nn.Module:
        """BPDA backward: the straight-through estimator the defense was trained with (clipped identity)."""
        if backward == "identity":
            return nn.Hardtanh(0.0, 1.0)
        raise ValueError(f"unknown BPDA backward {backward!r}")

    def extra_repr(self) -> str:
        kind = "dynamic" if isinstance(self.thresholds, nn.Parameter) else "fixed"
        return f"levels={self.steps + 1}, {kind}"


@REGISTRY.register
class QuantizedActivations(Defense):
    """Quantized activations: every ReLU of the CNN becomes a 2^bits-level step function, fixed or learned (DQA).

    Rakin et al. (2018). Definition used here (the paper's exact equations could not be consulted): a bounded
    activation on [0, 1] with 2^bits evenly spaced output levels; ``fixed`` puts the thresholds halfway between
    levels, ``dynamic`` learns them per layer during training. Trained with a straight-through estimator (see
    :class:`QuantizedActivation`) and, as in the paper, with PGD adversarial training (``adv_train = "pgd"``: each
    batch replaced by PGD examples crafted with the STE active, Madry et al.'s settings; see :mod:`defenses.advtrain`).
    ``bits`` default 2: the middle of the paper's 1–3 bits. ``whitebox`` sees the true gradient of the deployed
    function (zero a.e.: gradient masking); ``bpda`` back-propagates through the STE the defense was trained with.
    """

    name = "dqa"
    bpda_variants = ("identity",)
    params = (
        Param("bits", int, 2, "activation bits: 2^bits output levels (paper: 1, 2, 3)", low=1, high=3, in_id=True),
        Param("mode", str, "dynamic", "fixed: thresholds halfway between levels; dynamic: thresholds learned (DQA)",
              choices=("fixed", "dynamic"), in_id=True),
        Param("adv_train", str, "pgd", "pgd: Madry PGD adversarial training (the paper's); none: clean training",
              choices=("pgd", "none"), short="adv", in_id=True),
        *pgd_params("adv_"),
        EPOCHS,
    )

    def training_overrides(self) -> dict[str, Any]:
        return epochs_override(self.values)

    def activation(self) -> ActivationFactory:
        return partial(QuantizedActivation, self.values["bits"], self.values["mode"] == "dynamic")

    def training_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.values["adv_train"] == "none":
            return x, y
        return pgd_batch(model, x, y, self.values, "adv_", progress), y

    def after_step(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, QuantizedActivation) and isinstance(module.thresholds, nn.Parameter):
                module.project_()
