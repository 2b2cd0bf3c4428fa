"""The attack adapter base class and registry.

An adapter only perturbs: it receives the model the threat model allows (defended model, BPDA copy or
substitute) as one ``nn.Module`` on [0, 1] inputs, a batch, the labels, eps and optional target labels, and
returns adversarial inputs. It never prints, writes files or scores itself: the runner clips the result to
[0, 1] and to the eps ball and recomputes success on the real defended model (foolbox 3's rule: do not trust
the attack). Device and eval mode are the runner's business too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bench.registry import Component, Param, Registry

TARGET_MODES = ("none", "random", "next", "least_likely", "all")


def _never() -> bool:
    return False


@dataclass
class Runtime:
    """How the harness runs an attack (not part of its parameters): ``batch`` images per step on ``device``;
    ``early_stop``: an attack may skip the work that the attacked model's verdict or zero gradient already decides
    (a pooled attack drops a decided image; true only when that model's forward pass is the defended model's and
    deterministic); ``should_stop`` is polled between
    batches (Ctrl-C); ``ids`` names each attempt of the batch stably within its cell (random starts follow it, so
    an image gets the same start whichever other images are attacked with it); ``space`` is the threat's per-image
    change of the attacked model's input (:attr:`bench.threats.base.Source.space`): a pooled attack feeds the model
    ``space(iterate, image)`` instead of the iterate."""

    batch: int = 256
    device: str = "cpu"
    early_stop: bool = True
    should_stop: Callable[[], bool] = field(default=_never)
    ids: torch.Tensor | None = None
    space: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


EOT = Param("eot", int, 1, "Expectation over Transformation: gradients (and losses) on the mean logits of this many "
            "forward passes, for randomized defenses; bpda picks 10 by itself for a randomized custom defense",
            low=1, high=1000, keyed_at_default=False)


def target_param(default: str = "none", modes: tuple[str, ...] = TARGET_MODES) -> Param:
    """The ``target`` parameter: ``none`` (untargeted) or how target labels are chosen (never the true label)."""
    return Param("target", str, default, "untargeted (none) or target choice: random (seeded), next ((y+1) mod 10), "
                 "least_likely (lowest logit on the attacked model), all (every other class)", choices=modes)


class Attack(Component):
    """Base of attack adapters.

    Class attributes: ``norm`` of the perturbation (``linf``, ``l2``, ``l0``); ``bounded`` attacks take the
    suite's ``eps`` list, minimum-norm attacks do not (``clip_param`` names a parameter that bounds their L∞
    size instead, e.g. ``cw_l2``'s ``clip_linf``); ``gradient`` attacks need the model's gradients (so they run
    on the substitute under ``blackbox`` and through BPDA under ``bpda``); ``iterative`` separates multi-step from
    single-step attacks for the ``single>iter`` red flag; ``check_convergence`` attacks (with a ``steps``
    parameter) are re-run with doubled steps at the largest eps for the ``not-converged`` red flag.
    ``revision`` is raised when a fix changes an adapter's results: it is part of the cell key (through
    :meth:`key_revision`, which may raise it for some parameters only), so a results directory never resumes a
    cell computed before the fix. ``pooled`` attacks run the harness's step loop: they
    get every attempt at once (on the CPU) and batch them themselves by ``runtime.batch``. ``stats`` is what an
    attack reports about its last run (e.g. ``late_loss_gain`` for the ``unstable-loss`` flag). Every gradient
    attack also takes ``eot``: its own where it declares one (APGD averages gradients per step), else the
    harness's (:data:`EOT`, added to its ``params`` and applied to the model, see :class:`bench.bpda.EOT`).
    """

    norm: ClassVar[str] = "linf"
    bounded: ClassVar[bool] = True
    gradient: ClassVar[bool] = True
    iterative: ClassVar[bool] = True
    clip_param: ClassVar[str | None] = None
    check_convergence: ClassVar[bool] = False
    revision: ClassVar[int] = 0
    pooled: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.gradient and all(p.name != EOT.name for p in cls.params):
            cls.params = (*cls.params, EOT)

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.runtime = Runtime()
        self.stats: dict[str, Any] = {}

    @classmethod
    def harness_eot(cls, values: dict[str, Any]) -> int:
        """Forward passes the harness averages for this attack (1 when the attack does EOT itself or has none)."""
        return int(values.get(EOT.name, 1)) if any(p is EOT for p in cls.params) else 1

    @classmethod
    def key_revision(cls, values: dict[str, Any]) -> int:
        """The revision in the key of a cell with these parameter values (default: :attr:`revision`)."""
        return cls.revision

    @classmethod
    def bound_norm(cls) -> str:
        """The norm of the cell's eps: the attack's own, or L∞ when a ``clip_param`` bounds a minimum-norm attack."""
        return "linf" if cls.clip_param else cls.norm

    @property
    def target_mode(self) -> str:
        return self.values.get("target", "none")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                target: torch.Tensor | None) -> torch.Tensor:
        """Adversarial versions of ``x`` (labels ``y``); ``target`` holds target labels when targeted."""
        raise NotImplementedError

    def passes(self) -> tuple[float, float]:
        """(forward, backward) passes per attempt when every image takes every step: the upper bound
        ``bench run --dry-run`` estimates from. Default: ``steps`` × ``restarts`` of each (one pass for attacks
        without steps); gradient-free attacks use forwards only. Ensembles add up their components."""
        parts = self.components()
        if parts:
            costs = [part.passes() for _, part in parts]
            return sum(f for f, _ in costs), sum(b for _, b in costs)
        steps = float(self.values.get("steps", 1) * self.values.get("restarts", 1))
        return (steps, steps) if self.gradient else (steps, 0.0)

    def components(self) -> list[tuple[str, Attack]]:
        """An ensemble's attacks in order, as (label, adapter); empty for a single attack.

        The harness, not the adapter, runs an ensemble: each component only on the images still robust on the
        defended model after the previous ones (AutoAttack's rule), with a per-image robust mask per component.
        """
        return []

    @staticmethod
    def torchattacks_call(attack: Any, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Run a torchattacks attack untargeted on ``y`` or targeted on ``target`` (its 'by label' mode)."""
        if target is None:
            return attack(x, y)
        attack.set_mode_targeted_by_label(quiet=True)
        return attack(x, target)


REGISTRY: Registry[Attack] = Registry("attack", Attack, "bench.attacks", "qusec_bench.attacks")
