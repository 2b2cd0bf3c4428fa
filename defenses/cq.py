"""Constant Quantization (CQ) of QuSecNets, and the quantization layer CQ and TQ share.

Khalid, Ali et al., "QuSecNets: Quantization-based Defense Mechanism for Securing Deep Neural Network against
Adversarial Attacks" (IOLTS 2019, arXiv:1811.01437). The layer is written by hand because no library has it:
torchattacks and ART ship attacks and generic preprocessors (ART's bit-depth reduction is a hard rounding with
no per-pixel thresholds), not the paper's sigmoid-sum quantizer with constant or trainable per-pixel thresholds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.registry import AUTO, Param
from defenses.base import REGISTRY, Defense

THRESHOLD_KINDS = ("midpoint", "uniform")


def levels_param(default: int) -> Param:
    return Param("levels", int, default, 'quantization levels n (n − 1 thresholds); "auto": the error-resilience '
                 "analysis picks n (bench resilience, suite table [resilience])", low=2, high=256, short="n",
                 in_id=True, auto=True)


def steepness_param(default: float) -> Param:
    return Param("z", float, default, "sigmoid steepness of eq. 1 (paper: CQ 50, TQ 5)", positive=True, high=1000.0,
                 in_id=True)


HARD = Param("hard", bool, False, "exact steps (x > t_k) instead of sigmoids at inference (not in training); "
             "zero gradient: the non-differentiable variant, comparable to bit-depth reduction",
             inference_only=True)


def constant_thresholds(levels: int, kind: str = "midpoint") -> torch.Tensor:
    """The n − 1 constant thresholds: ``midpoint`` t_k = (2k−1)/(2(n−1)), halfway between the output levels
    k/(n−1) (n = 2: 0.5), or ``uniform`` t_k = k/n."""
    k = torch.arange(1, levels, dtype=torch.float32)
    return (2 * k - 1) / (2 * (levels - 1)) if kind == "midpoint" else k / levels


def checked_levels(values: dict[str, Any]) -> int:
    if values["levels"] == AUTO:
        raise BenchError('levels = "auto" is resolved by bench run from the suite\'s [resilience] table; '
                         "set explicit levels to build the model elsewhere")
    return int(values["levels"])


class _Steps(torch.autograd.Function):
    """The hard quantizer: mean over k of the steps (x > t_k); its gradient is zero (there is none)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-1) > thresholds).to(x.dtype).mean(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(grad), None


class QuantizationLayer(nn.Module):
    """y = 1/(n−1) · Σ_{k=1}^{n−1} sigmoid(z · (x − t_k)), per pixel and channel (QuSecNets eq. 1).

    ``thresholds`` has shape (n−1,) (the same function for every pixel: CQ) or (C, H, W, n−1) (one per pixel and
    channel: TQ, then ``trainable`` makes them a parameter). ``hard`` uses exact steps in eval mode.
    """

    def __init__(self, thresholds: torch.Tensor, z: float, *, trainable: bool = False, hard: bool = False) -> None:
        super().__init__()
        if trainable:
            self.thresholds = nn.Parameter(thresholds.detach().clone())
        else:
            self.register_buffer("thresholds", thresholds.detach().clone())
        self.z = z
        self.hard = hard

    @property
    def levels(self) -> int:
        return self.thresholds.shape[-1] + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hard and not self.training:
            return _Steps.apply(x, self.thresholds)
        return torch.sigmoid(self.z * (x.unsqueeze(-1) - self.thresholds)).mean(-1)

    @torch.no_grad()
    def inverse(self, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Pixels x in [lo, hi] with Q(x) = v, for v in [Q(lo), Q(hi)], by bisection (Q is increasing per pixel;
        48 halvings reach float32's resolution in [0, 1]). Not for ``hard`` steps, which skip values."""
        a, b = lo.clone(), hi.clone()
        for _ in range(48):
            middle = (a + b) / 2
            below = self(middle) < v
            a, b = torch.where(below, middle, a), torch.where(below, b, middle)
        return (a + b) / 2

    @torch.no_grad()
    def project_(self) -> None:
        """Keep the thresholds sorted and inside [0, 1] (after an optimiser step)."""
        self.thresholds.copy_(self.thresholds.clamp(0.0, 1.0).sort(-1).values)

    def bpda_approx(self, backward: str, z: float) -> nn.Module | None:
        """BPDA backward (see :mod:`bench.bpda`): ``identity`` (straight-through) or ``soft``, the same sigmoid
        sum with steepness ``z`` and the same thresholds, never hard."""
        if backward == "identity":
            return None
        if backward == "soft":
            return QuantizationLayer(self.thresholds, z)
        raise ValueError(f"unknown BPDA backward {backward!r}")

    def extra_repr(self) -> str:
        return f"levels={self.levels}, z={self.z:g}, thresholds={tuple(self.thresholds.shape)}, hard={self.hard}"


@REGISTRY.register
class ConstantQuantization(Defense):
    """Constant Quantization (CQ): a fixed sigmoid quantizer in front of the CNN, trained with it in place.

    QuSecNets (Khalid, Ali et al. 2019) eq. 1 with constant, linearly distributed thresholds and z = 50 (the
    paper's values); n = 2 is the paper's MNIST setting. Threat: any perturbation norm; the defense relies on
    pixels not crossing a threshold. Default thresholds ``midpoint``: halfway between output levels.
    """

    name = "cq"
    bpda_variants = ("identity", "soft")
    params = (
        levels_param(2),
        steepness_param(50.0),
        Param("thresholds", str, "midpoint", "midpoint: t_k = (2k−1)/(2(n−1)); uniform: t_k = k/n",
              choices=THRESHOLD_KINDS),
        HARD,
    )

    def monotone_preprocess(self) -> bool:
        return not self.values["hard"]

    def preprocess(self) -> nn.Module:
        thresholds = constant_thresholds(checked_levels(self.values), self.values["thresholds"])
        return QuantizationLayer(thresholds, self.values["z"], hard=self.values["hard"])
