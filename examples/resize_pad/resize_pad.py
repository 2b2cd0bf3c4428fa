"""Random resizing and padding (Xie, Wang, Zhang, Ren & Yuille, ICLR 2018), for images of any square size.

Each forward pass resizes every image to its own random side r in [size, size + pad), pads it at a random offset
to size + pad, and resizes it back to ``size`` (the classifier's input) with bilinear interpolation; one draw per
image, as in the paper (a draw per batch would make a whole batch's accuracy hang on one draw). It is
differentiable, but two passes differ: the harness flags ``random`` and ``bpda`` attacks it with EOT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResizePad(nn.Module):
    """Random resize to r ∈ [size, size + pad), random zero padding to size + pad, resize back to size."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.transform(image[None]) for image in x])

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        size = image.shape[-1]
        side = int(torch.randint(size, size + self.pad, ()))
        left, top = (int(v) for v in torch.randint(0, size + self.pad - side + 1, (2,)))
        resized = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
        padded = F.pad(resized, (left, size + self.pad - side - left, top, size + self.pad - side - top))
        return F.interpolate(padded, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def build(pad: int = 4) -> nn.Module:
    return ResizePad(pad)
