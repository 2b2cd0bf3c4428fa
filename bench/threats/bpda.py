"""BPDA: white-box through the defense with a differentiable backward approximation (Athalye et al. 2018)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.bpda import bpda_model
from bench.flags import NO_GRAD_LEVEL
from bench.registry import Param
from bench.threats.base import REGISTRY, Source, Threat

if TYPE_CHECKING:
    from bench.evaluate import Context
    from bench.grid import Cell


NO_BPDA = "none"
AUTO = "auto"  # chosen from the model probe: for defenses the harness did not write (``custom``)
EOT_SAMPLES = 10


@REGISTRY.register
class BPDA(Threat):
    """BPDA: white-box against a copy of the defended model whose gradient-masking parts keep their exact forward
    pass but back-propagate through an approximation (Athalye, Carlini & Wagner, ICML 2018).

    ``backward`` (suite table ``[bpda]``, a list runs each): ``identity`` (straight-through) or ``soft`` (the
    derivative of the same sigmoid sum with steepness ``soft_z``; CQ/TQ only, identity elsewhere). A defense with
    nothing to approximate gets the ``whitebox`` cell. For code the harness did not write (``custom``) the backward
    is chosen from the model probe: straight-through where the input gradient is zero, missing or non-finite, the
    exact gradient otherwise; a randomized forward pass is attacked with EOT over ``EOT_SAMPLES`` passes.
    """

    name = "bpda"
    short = "bpda"
    gradient_only = True
    params = (
        Param("backward", str, "identity", "backward pass of gradient-masking parts: identity (straight-through) or "
              "soft (the derivative of the same sigmoid sum with steepness soft_z; CQ/TQ only); a list runs each",
              choices=("identity", "soft")),
        Param("soft_z", float, 1.0, "sigmoid steepness of the soft BPDA backward", positive=True, high=1000.0),
    )
    list_params = ("backward",)

    @classmethod
    def variants(cls, defense: Any, settings: dict[str, Any]) -> list[dict[str, Any]]:
        if defense.untrusted:
            return [{"backward": AUTO}]
        if not defense.bpda_variants:
            return [{"backward": NO_BPDA}]
        chosen = dict.fromkeys(b if b in defense.bpda_variants else "identity" for b in settings["backward"])
        return [{"backward": b, **({"z": settings["soft_z"]} if b == "soft" else {})} for b in chosen]

    @classmethod
    def label(cls, params: dict[str, Any]) -> str:
        backward = params.get("backward")
        return f"bpda-{backward}" if backward not in (None, "identity", NO_BPDA, AUTO) else "bpda"

    @classmethod
    def same_as_whitebox(cls, params: dict[str, Any]) -> bool:
        return params.get("backward") == NO_BPDA

    def source(self, cell: Cell, ctx: Context) -> Source:
        model = ctx.models.model(cell)
        if self.same_as_whitebox(cell.threat_params):
            return Source(model)
        if cell.threat_params["backward"] == AUTO:
            facts = ctx.probe(cell)
            masked = facts["grad_zero"] > NO_GRAD_LEVEL
            samples = EOT_SAMPLES if facts["randomized"] else 1
            return Source(bpda_model(model, "identity") if masked else model, eot=samples,
                          extra={"bpda_backward": "identity" if masked else "exact"})
        return Source(bpda_model(model, cell.threat_params["backward"], cell.threat_params.get("z", 1.0)))
