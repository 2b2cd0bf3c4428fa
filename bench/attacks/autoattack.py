"""AutoAttack: the ensemble of apgd_ce, apgd_dlr, fab and square that the harness runs component by component."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bench.attacks.base import REGISTRY, Attack
from bench.registry import Param

VERSIONS = ("standard", "plus", "rand")


@REGISTRY.register
class AutoAttack(Attack):
    """AutoAttack: APGD-CE, APGD-T, FAB-T and Square, per-image worst case, L∞ (Croce & Hein, ICML 2020).

    An ensemble, not an attack of its own: the harness runs its components in order, each only on the images
    still classified correctly by the defended model after the ones before (AutoAttack's rule), and keeps a
    robust mask per component. Components as fra31/auto-attack's ``set_version`` defines them, 100 steps each:
    ``standard`` apgd-ce (1 restart), apgd-t (9 targets), fab-t (9 targets), square (5,000 queries); ``plus``
    apgd-ce and apgd-dlr (5 restarts each), fab (untargeted, 5 restarts), square, apgd-t, fab-t; ``rand`` (for
    randomized defenses) apgd-ce and apgd-dlr with 20 EOT samples per step. ``steps``, ``targets`` and
    ``square_queries`` trade strength for time (a masked-gradient defense leaves every image to Square, which
    then costs ``square_queries`` forward passes per image). Unlike the reference, Square runs through the
    ``square`` adapter, whose torchattacks schedule of square sizes is rescaled to the number of queries.
    Example: ``{ name = "autoattack", eps = [0.1, 0.3], threat = ["whitebox", "bpda"], square_queries = 1000 }``.
    """

    name = "autoattack"
    params = (
        Param("version", str, "standard", "the components: standard (apgd-ce, apgd-t, fab-t, square), plus "
              "(apgd-ce, apgd-dlr, fab, square, apgd-t, fab-t; more restarts), rand (apgd-ce, apgd-dlr with EOT)",
              choices=VERSIONS),
        Param("steps", int, 100, "iterations of the APGD and FAB components (per restart and target)", low=1),
        Param("targets", int, 9, "target classes of apgd-t and fab-t (the most likely other classes)", low=1,
              high=9),
        Param("square_queries", int, 5000, "queries per image of the square component", low=1, short="queries"),
    )

    def components(self) -> list[tuple[str, Attack]]:
        v = self.values
        steps, targets = {"steps": v["steps"]}, {"steps": v["steps"], "targets": v["targets"]}
        square = ("square", "square", {"queries": v["square_queries"]})
        apgd_t, fab_t = ("apgd-t", "apgd_dlr", targets), ("fab-t", "fab", targets)
        plan = {
            "standard": [("apgd-ce", "apgd_ce", steps), apgd_t, fab_t, square],
            "plus": [("apgd-ce", "apgd_ce", {**steps, "restarts": 5}),
                     ("apgd-dlr", "apgd_dlr", {**steps, "restarts": 5}),
                     ("fab", "fab", {**steps, "restarts": 5}), square, apgd_t, fab_t],
            "rand": [("apgd-ce", "apgd_ce", {**steps, "eot": 20}), ("apgd-dlr", "apgd_dlr", {**steps, "eot": 20})],
        }[v["version"]]
        return [(label, _adapter(name, given)) for label, name, given in plan]

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("autoattack is an ensemble and does not perturb by itself: the harness runs its "
                           "components() one after another, each on the images still robust")


def _adapter(name: str, given: dict[str, Any]) -> Attack:
    """The registered adapter ``name`` with ``given`` over its defaults."""
    cls = REGISTRY.get(name)
    return cls({p.name: given.get(p.name, p.default) for p in cls.params})
