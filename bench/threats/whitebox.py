"""White-box: the attacker differentiates the defended model as it is."""

from __future__ import annotations

from typing import TYPE_CHECKING


from bench.threats.base import REGISTRY, Source, Threat

if TYPE_CHECKING:
    from bench.evaluate import Context
    from bench.grid import Cell


@REGISTRY.register
class Whitebox(Threat):
    """White-box: the attack gets the defended model's own gradients, through the defense as it is.

    A defense that masks gradients (quantization, rounding) can look robust here without being so: compare with
    ``bpda`` and gradient-free attacks.
    """

    name = "whitebox"
    short = "wb"

    def source(self, cell: Cell, ctx: Context) -> Source:
        return Source(ctx.models.model(cell))
