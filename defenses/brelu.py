"""Bounded ReLU with Gaussian data augmentation (Zantedeschi, Nicolae & Rawat, "Efficient Defenses Against
Adversarial Attacks", AISec 2017, arXiv:1707.06728)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from bench.models import ActivationFactory
from bench.registry import Param, PerDataset
from defenses.base import REGISTRY, Defense


@REGISTRY.register
class BoundedReLU(Defense):
    """BReLU + Gaussian data augmentation: ReLUs become min(max(0, x), t), trained on clean and noisy copies.

    Zantedeschi et al. (AISec 2017): BReLU with t = 1, and Gaussian data augmentation (GDA) with σ = 0.3 on MNIST
    and σ = 0.05 on CIFAR-10, the values of the paper's experiments. BReLU is ``torch.nn.Hardtanh(0, t)`` (same
    function and gradient). GDA is written here rather than taken from ART's ``GaussianAugmentation`` because
    that one is NumPy with NumPy's global RNG, outside the training graph; this one appends to each batch a copy
    with N(0, σ²) noise from the torch RNG (seeded by the harness around training), clipped to [0, 1], with the
    same labels (ART's ``augmentation=True, ratio=1`` instead draws the images to copy with replacement).
    Threat: any norm. Everything is differentiable, so the ``bpda`` threat equals ``whitebox``.
    """

    name = "brelu"
    params = (
        Param("t", float, 1.0, "upper bound of the activation (paper: 1)", positive=True, in_id=True),
        Param("sigma", float, PerDataset(mnist=0.3, cifar10=0.05),
              "std of the Gaussian noise added to the augmented copy (paper: 0.3 MNIST, 0.05 CIFAR-10); 0: no GDA",
              low=0.0, high=1.0, in_id=True),
    )

    def activation(self) -> ActivationFactory:
        return partial(nn.Hardtanh, 0.0, self.values["t"])

    def training_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.values["sigma"] == 0:
            return x, y
        noisy = (x + self.values["sigma"] * torch.randn_like(x)).clamp(0.0, 1.0)
        return torch.cat([x, noisy]), torch.cat([y, y])
