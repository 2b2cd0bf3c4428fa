"""Feature squeezing (Xu, Evans & Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
NDSS 2018): bit-depth reduction and median smoothing in front of the undefended CNN, or as Xu et al.'s detector.

Written in torch because ART's ``FeatureSqueezing`` and ``SpatialSmoothing`` are NumPy/SciPy preprocessors applied
per call outside the model graph; here they are modules inside it, on a batch, on the model's device, and give the
same outputs as ART (tests/test_comparison_defenses.py checks it on real MNIST and CIFAR-10 images).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from bench.registry import Param, PerDataset, fmt_value
from bench.types import Dataset
from defenses.base import REGISTRY, Defense

FALSE_POSITIVES = 0.05  # Xu et al.: the threshold is chosen for a 5 % false-positive rate on legitimate images
CALIBRATION_IMAGES = 2000
CALIBRATION_SEED = 0


class BitDepth(nn.Module):
    """round(x · (2^b − 1)) / (2^b − 1) on [0, 1] inputs, as ART ``FeatureSqueezing``: ``np.rint`` rounds halves to
    even like ``torch.round``, and like ART under NumPy 2 the product is rounded in float64 (then cast back), so
    outputs agree bit for bit on any input. Its gradient is zero: ``bpda_approx`` makes it the identity."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = 2 ** self.bits - 1
        return (torch.round(x.double() * top) / top).to(x.dtype)

    def bpda_approx(self, backward: str, z: float) -> None:
        return None

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class MedianSmoothing(nn.Module):
    """Per-channel median over an h×w window, exactly as ``scipy.ndimage.median_filter(mode="reflect")`` (ART
    ``SpatialSmoothing``): the window covers rows i − h//2 … i + h − 1 − h//2 (so an even window reaches one pixel
    further up/left than down/right), borders are padded by half-sample symmetric reflection (``d c b a | a b c d``,
    the edge pixel repeated; torch's own "reflect" pad drops the edge pixel and is not used), and for an even
    number of values the upper of the two middle ones is taken (rank h·w // 2 of the sorted window). Its gradient
    goes to the selected pixel; ``bpda_approx`` makes it the identity."""

    def __init__(self, window: tuple[int, int]) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.window
        padded = _symmetric_pad(_symmetric_pad(x, 2, h), 3, w)
        patches = padded.unfold(2, h, 1).unfold(3, w, 1).flatten(-2)
        return patches.kthvalue(h * w // 2 + 1, dim=-1).values

    def bpda_approx(self, backward: str, z: float) -> None:
        return None

    def extra_repr(self) -> str:
        return f"window={self.window}"


def _symmetric_pad(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    n = x.shape[dim]
    before = size // 2
    index = torch.arange(-before, n + size - 1 - before, device=x.device)
    index = torch.where(index < 0, -index - 1, torch.where(index >= n, 2 * n - 1 - index, index))
    return x.index_select(dim, index)


class SqueezeDetector:
    """Xu et al.'s detector: score = max over squeezers of ‖softmax(f(x)) − softmax(f(squeeze(x)))‖₁ with the
    undefended model f; an image is flagged when its score exceeds the threshold that flags 5 % of a seeded
    sample of 2,000 clean training images."""

    def __init__(self, model: nn.Module, squeezers: list[nn.Module], train_x: torch.Tensor) -> None:
        self.model = model
        self.squeezers = [s.eval() for s in squeezers]
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
        self.threshold = torch.quantile(self.score(train_x[pick[:CALIBRATION_IMAGES]]), 1 - FALSE_POSITIVES).item()

    @torch.inference_mode()
    def score(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(device)
            p = self.model(xb).softmax(1)
            out.append(torch.stack([(p - self.model(s(xb)).softmax(1)).abs().sum(1) for s in self.squeezers])
                       .amax(0).cpu())
        return torch.cat(out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > self.threshold


@REGISTRY.register
class FeatureSqueezing(Defense):
    """Feature squeezing: bit-depth reduction and/or median smoothing before the undefended CNN (or as a detector).

    Xu, Evans & Qi (NDSS 2018). Defaults are the paper's best squeezers: 1-bit depth on MNIST, 5-bit on CIFAR-10,
    2×2 median smoothing on both. ``squeezer = "both"`` chains bit depth then median in front of the classifier.
    The classifier is the undefended model itself, not retrained (the harness loads ``none``'s weights).
    ``detect = true`` is Xu et al.'s detection mode instead: the classifier runs on unsqueezed inputs and the
    squeezers (with ``both``: each one separately, the paper's joint detector) only feed the detector,
    scored as ``detected_acc``. Threat: any norm. BPDA: identity backward through both.
    """

    name = "squeeze"
    shares_weights_with_none = True
    bpda_variants = ("identity",)
    params = (
        Param("squeezer", str, "bits", "bits: bit-depth reduction; median: median smoothing; both: bits then median",
              choices=("bits", "median", "both")),
        Param("bits", int, PerDataset(mnist=1, cifar10=5), "bit depth (Xu et al.: 1 on MNIST, 5 on CIFAR-10)",
              low=1, high=8),
        Param("median", tuple, (2, 2), "median window [h, w] (Xu et al.: 2×2 on MNIST and CIFAR-10)", low=1, high=8),
        Param("detect", bool, False, "Xu et al.'s detector (5 % false positives on clean training images) instead "
              "of squeezing in front of the classifier"),
    )

    def __init__(self, dataset: Dataset, values: dict[str, Any]) -> None:
        super().__init__(dataset, values)
        if values["detect"]:
            self.bpda_variants = ()  # the classifier path has nothing to approximate: bpda is the white-box cell

    @classmethod
    def make_id(cls, values: Mapping[str, Any], dataset: Dataset) -> str:
        """``squeeze(bits=1)``, ``squeeze(median=2x2)``, ``squeeze(bits=1,median=2x2,detect=true)``: only the
        squeezers in use are shown."""
        v = cls.resolve(values, dataset)
        parts = [f"{k}={fmt_value(v[k])}" for k in ("bits", "median") if v["squeezer"] in (k, "both")]
        if v["detect"]:
            parts.append("detect=true")
        return f"{cls.name}({','.join(parts)})"

    def squeezers(self) -> list[nn.Module]:
        kind = self.values["squeezer"]
        return ([BitDepth(self.values["bits"])] if kind in ("bits", "both") else []) + (
            [MedianSmoothing(self.values["median"])] if kind in ("median", "both") else [])

    def preprocess(self) -> nn.Module:
        return nn.Identity() if self.values["detect"] else nn.Sequential(*self.squeezers())

    def detector(self, model: nn.Module, train_x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return SqueezeDetector(model, self.squeezers(), train_x) if self.values["detect"] else None
