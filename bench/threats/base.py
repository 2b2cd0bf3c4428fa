"""The threat-model base class and registry.

A threat model decides what the attacker works on: the defended model itself (``whitebox``), a copy with an
approximate backward pass (``bpda``), a substitute trained from label queries (``blackbox``), or the undefended
model (``oblivious``). The attack's output is always scored on the real defended model by the runner. A threat
may own a suite table of settings (``[blackbox]``, ``[bpda]``) declared as ``params``; they become the cell's
``threat_params``. Adding a threat is one module in this package (or a plug-in) with a registered subclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from bench.registry import Component, Registry

if TYPE_CHECKING:
    from bench.evaluate import Context
    from bench.grid import Cell
    from defenses.base import Defense


class InputSpace(Protocol):
    """A per-image change of variables for the attack (see :class:`Source`)."""

    def __call__(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The attacked model's input for the attack's iterate ``x`` of ``image`` (differentiable in ``x``)."""
        ...

    def decode(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Pixels within the iterate's eps ball on which the defended model computes what the attacked model
        computes on ``self(x, image)``."""
        ...


@dataclass
class Source:
    """What a cell's attack runs on.

    ``model`` is the network the attacker differentiates or queries. ``shared`` names crafted examples that do
    not depend on the defense (the same undefended model or substitute for every defense): cells with the same
    ``shared`` key reuse one crafting run. ``extra`` holds fields for the cell's record. ``eot`` > 1: gradient
    attacks run on the mean of that many forward passes (Expectation over Transformation). ``space``: the attack's
    iterates are not the pixels themselves; ``model`` gets ``space(iterate, image)`` and the runner scores
    ``space.decode(iterate, image)`` (only the harness's step loop, :attr:`Threat.pooled_only`, supports it).
    """

    model: nn.Module
    shared: str | None = None
    eot: int = 1
    space: InputSpace | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Threat(Component):
    """Base of threat models.

    ``short`` is the label in tables. ``gradient_only`` threats refuse gradient-free attacks (``bpda`` changes only
    the backward pass). ``transfer`` threats craft on another model than the defended one: the attack cannot stop
    an image early on its own model's verdict, and the examples are crafted on every evaluated image.
    ``pooled_only`` threats give the attack a :attr:`Source.space`, which only pooled attacks (the harness's step
    loop) take.
    ``params`` are the settings of the threat's suite table (named like the threat); a parameter named in
    ``list_params`` may be a list there, each value a variant of the threat (see ``variants``).
    """

    short: ClassVar[str]
    list_params: ClassVar[tuple[str, ...]] = ()
    gradient_only: ClassVar[bool] = False
    transfer: ClassVar[bool] = False
    pooled_only: ClassVar[bool] = False

    @classmethod
    def refusal(cls, attack: type[Any]) -> str | None:
        """Why this threat cannot run the attack class ``attack`` (a suite error's text), or None when it can."""
        if cls.gradient_only and not attack.gradient:
            return f"{attack.name} uses no gradients, so {cls.name} does not apply to it"
        if cls.pooled_only and not attack.pooled:
            from bench.attacks import REGISTRY as ATTACKS

            pooled = ", ".join(n for n in ATTACKS.names() if ATTACKS.get(n).pooled)
            return f"{cls.name} runs only attacks of the harness's step loop ({pooled}), not {attack.name}"
        return None

    @classmethod
    def variants(cls, defense: Defense, settings: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``threat_params`` of the cells of one (defense, attack): one dict per variant of the threat."""
        return [dict(settings)]

    @classmethod
    def label(cls, params: dict[str, Any]) -> str:
        """The threat as shown in tables, e.g. ``wb`` or ``bpda-soft``."""
        return cls.short

    @classmethod
    def same_as_whitebox(cls, params: dict[str, Any]) -> bool:
        """True when the cell is the ``whitebox`` computation (e.g. bpda on a defense with nothing to approximate)."""
        return False

    def requires(self, cell: Cell, ctx: Context) -> list[tuple[str, Cell]]:
        """Trained artifacts the cell needs besides its own model, in dependency order: ``("model", cell)`` or
        ``("substitute", cell)`` (executors train them first, ``--fresh`` forgets them)."""
        return []

    def check(self, cell: Cell, ctx: Context) -> None:
        """Raise a :class:`~bench.errors.BenchError` before any cell runs when the data cannot serve this cell
        (e.g. too few test images left for the black-box attacker's holdout)."""

    def source(self, cell: Cell, ctx: Context) -> Source:
        """The model the cell's attack runs on."""
        raise NotImplementedError


REGISTRY: Registry[Threat] = Registry("threat", Threat, "bench.threats", "qusec_bench.threats")
