"""Quantized space: attack the classifier on the exact set of quantized inputs the eps ball reaches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.threats.base import REGISTRY, Source, Threat

if TYPE_CHECKING:
    from bench.evaluate import Context
    from bench.grid import Cell

TINY = 1e-12  # a pixel interval this short on one side of the image is empty (the image at 0 or 1)


class QuantizedSpace:
    """Per image x0 and pixel: the attack's iterate x in [lo, hi] = [max(x0 − eps, 0), min(x0 + eps, 1)] stands for
    the classifier input v that interpolates Q linearly between lo, x0 and hi: v = Q(x0) at x = x0, Q(lo) at lo,
    Q(hi) at hi. Q being continuous and increasing per pixel, the iterates reach exactly the box [Q(lo), Q(hi)] of
    quantized images the ball reaches, the attack starts from the clean image's, and ``decode`` returns pixels in
    the ball that Q maps onto v (the quantizer's ``inverse``). At x = x0 the slope is the whole interval's, so that
    a pixel at 0 or 1 gets a gradient on its first step.
    """

    def __init__(self, quantizer: nn.Module, eps: float) -> None:
        self.quantizer = quantizer
        self.eps = eps

    def _bounds(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (image - self.eps).clamp(0, 1), (image + self.eps).clamp(0, 1)

    def __call__(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(image)
        with torch.no_grad():
            q_lo, q_image, q_hi = self.quantizer(lo), self.quantizer(image), self.quantizer(hi)
            slope = torch.where(x < image, (q_image - q_lo) / (image - lo).clamp_min(TINY),
                                torch.where(x > image, (q_hi - q_image) / (hi - image).clamp_min(TINY),
                                            (q_hi - q_lo) / (hi - lo)))
        return q_image + slope * (x - image)

    def decode(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds(image)
        with torch.no_grad():
            return self.quantizer.inverse(self(x.clamp(lo, hi), image), lo, hi)


@REGISTRY.register
class Quantized(Threat):
    """Quantized space: for a defense whose preprocessing Q quantizes each pixel by a continuous, increasing
    function (CQ and TQ, not ``hard``), the attack runs on the classifier behind Q, over the box [Q(x − eps),
    Q(x + eps)] of quantized images the eps ball reaches (exactly, Q being monotone), and each result is mapped
    back to pixels in the ball by inverting Q. Unlike BPDA it approximates no gradient: the classifier's gradient
    is exact, and the iterate can take any value between two quantization levels, which a pixel-space step of
    size eps/steps jumps over where Q is steep.

    Written by hand because no attack library knows the quantizer's inverse. It changes the attack's input per
    image (:class:`QuantizedSpace`), which only the harness's step loop supports: pooled attacks (``pgd``, ``bim``)
    only. Other defenses get no cell of this threat.
    """

    name = "quantized"
    short = "qs"
    gradient_only = True
    pooled_only = True

    @classmethod
    def variants(cls, defense: Any, settings: dict[str, Any]) -> list[dict[str, Any]]:
        return [dict(settings)] if defense.monotone_preprocess() else []

    def source(self, cell: Cell, ctx: Context) -> Source:
        model = ctx.models.model(cell)
        quantizer = getattr(model, "preprocess", None)
        if not hasattr(quantizer, "inverse") or cell.eps is None:
            raise BenchError(f"{cell.defense_id}: the quantized threat needs an L∞-bounded attack and a defense "
                             f"whose preprocessing has an inverse")
        return Source(model.classifier, space=QuantizedSpace(quantizer, cell.eps))
