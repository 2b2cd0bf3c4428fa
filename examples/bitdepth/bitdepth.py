"""Bit-depth reduction (Xu, Evans & Qi, NDSS 2018, feature squeezing): each pixel rounded to ``bits`` bits.

``torch.round`` has a zero gradient everywhere, so white-box gradient attacks see nothing: the harness flags
``no-grad`` and ``bpda`` back-propagates straight through the rounding.
"""

from __future__ import annotations

import torch
from torch import nn


class BitDepth(nn.Module):
    """x ↦ round(x · (2^bits − 1)) / (2^bits − 1), in [0, 1]."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.levels = 2**bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.levels) / self.levels


def build(bits: int = 1) -> nn.Module:
    return BitDepth(bits)
