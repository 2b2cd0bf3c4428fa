"""Oblivious: adversarial examples crafted on the undefended model, scored on the defended one."""

from __future__ import annotations

from typing import TYPE_CHECKING


from dataclasses import replace

from bench.threats.base import REGISTRY, Source, Threat

if TYPE_CHECKING:
    from bench.evaluate import Context
    from bench.grid import Cell


@REGISTRY.register
class Oblivious(Threat):
    """Oblivious: the attack runs on the undefended CNN (the ``none`` model of the same dataset, training and
    seed) and its examples are scored on the defended model (Carlini & Wagner's zero-knowledge adversary, AISec
    2017).

    This is what an evaluation measures that never differentiates through the defense; a defense that only
    holds here holds against no adaptive attacker. One crafting run per (attack, eps) serves every defense.
    """

    name = "oblivious"
    short = "obl"
    transfer = True

    @staticmethod
    def undefended(cell: Cell) -> Cell:
        return replace(cell, defense="none", defense_values={})

    def requires(self, cell: Cell, ctx: Context) -> list[tuple[str, Cell]]:
        return [("model", self.undefended(cell))]

    def source(self, cell: Cell, ctx: Context) -> Source:
        undefended = self.undefended(cell)
        return Source(ctx.models.model(undefended), shared=f"oblivious:{ctx.models.model_key(undefended)}")
