"""Black-box: transfer from a substitute trained by querying the defended model for labels (Papernot et al.)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.models import predict
from bench.registry import Param
from bench.train import cache_key
from bench.threats.base import REGISTRY, Source, Threat

if TYPE_CHECKING:
    from bench.evaluate import Context
    from bench.grid import Cell


@REGISTRY.register
class Blackbox(Threat):
    """Black-box: the attacker holds ``holdout`` test images disjoint from the evaluated ones, labels them by
    querying the defended model (labels only), trains its own substitute CNN (a different architecture) with
    Jacobian-based augmentation, crafts on the substitute and transfers (Papernot et al., AsiaCCS 2017).

    Settings: suite table ``[blackbox]``. Records carry the substitute's agreement with the target on the
    evaluated images and the label queries it used.
    """

    name = "blackbox"
    short = "bb"
    transfer = True
    params = (
        Param("holdout", int, 150, "test images the attacker holds, disjoint from the evaluated ones", low=10,
              high=5000),
        Param("rounds", int, 6, "Jacobian-augmentation rounds ρ (each doubles the substitute's training set)",
              low=0, high=10),
        Param("lam", float, 0.1, "Jacobian-augmentation step λ", positive=True, high=1.0),
        Param("epochs", int, 10, "substitute training epochs per round", low=1, high=1000),
        Param("lr", float, 1e-3, "substitute Adam learning rate", positive=True, high=10.0),
        Param("oracle", str, "target", "who labels the substitute's data: the defended model itself (Papernot et "
              "al.), or the undefended model (one substitute shared by every defense of a dataset)",
              choices=("target", "undefended")),
    )

    def requires(self, cell: Cell, ctx: Context) -> list[tuple[str, Cell]]:
        return [("model", ctx.models.oracle_cell(cell)), ("substitute", cell)]

    def check(self, cell: Cell, ctx: Context) -> None:
        ctx.models.holdout(cell)

    def source(self, cell: Cell, ctx: Context) -> Source:
        substitute, facts = ctx.models.substitute(cell)
        _, x, _ = ctx.models.eval_set(cell)
        clean = ctx.models.clean_predictions(cell)
        extra: dict[str, Any] = {
            "label_queries": facts.get("label_queries"),
            "substitute_agreement": round(float((predict(substitute, x) == clean).float().mean()), 6)}
        return Source(substitute, shared=f"blackbox:{cache_key(ctx.models.substitute_fields(cell))}", extra=extra)
