"""The grid: a validated suite → the list of independent cells (dataset × defense × attack × threat × eps).

A :class:`Cell` is plain data (JSON-able, no tensors, no models) so that any executor can ship it to a worker.
Its ``key`` hashes everything that changes its result; results are stored and resumed by that key. Its seed is
derived from the suite seed and its ``compute_key`` (so a cell's result does not depend on which worker runs it
or in what order), and ``compute_key`` is shared by cells that are the same computation, e.g. ``bpda`` on a
defense with nothing to approximate is the ``whitebox`` cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

from bench.attacks import REGISTRY as ATTACKS
from bench.errors import SuiteError
from bench.suite import Suite
from bench.train import TrainConfig, config_dict
from bench.types import Dataset, Threat
from defenses import REGISTRY as DEFENSES
from defenses.base import Defense

NO_BPDA = "none"


@dataclass(frozen=True)
class Cell:
    suite: str
    dataset: Dataset
    n: int
    sample: str
    seed: int
    train: TrainConfig
    defense: str
    defense_values: dict[str, Any]
    attack: str
    attack_values: dict[str, Any]
    threat: Threat
    eps: float | None
    threat_params: dict[str, Any] = field(default_factory=dict)
    blackbox: dict[str, Any] | None = None
    purpose: str = "grid"

    def spec(self) -> dict[str, Any]:
        """Everything that determines the cell's result, as JSON-able data."""
        data = asdict(self)
        data["dataset"], data["threat"] = self.dataset.value, self.threat.value
        data["train"] = config_dict(self.train)  # training settings added later stay out of the key at their defaults
        data["defense_values"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.defense_values.items()}
        del data["suite"], data["purpose"]
        revision = ATTACKS.get(self.attack).revision
        if revision:  # absent at 0, so the keys of adapters never revised stay what they were
            data["attack_revision"] = revision
        return data

    @cached_property
    def key(self) -> str:
        return _hash(self.spec())

    @cached_property
    def compute_key(self) -> str:
        """Equal for cells that are one computation (``bpda`` without anything to approximate = ``whitebox``)."""
        if self.threat is Threat.BPDA and self.threat_params.get("backward") == NO_BPDA:
            return replace(self, threat=Threat.WHITEBOX, threat_params={}).key
        return self.key

    @property
    def cell_seed(self) -> int:
        return int(hashlib.sha256(f"{self.seed}:{self.compute_key}".encode()).hexdigest()[:8], 16)

    @property
    def defense_id(self) -> str:
        return DEFENSES.get(self.defense).make_id(self.defense_values, self.dataset)

    @property
    def attack_id(self) -> str:
        return ATTACKS.get(self.attack).make_id(self.attack_values, self.dataset)

    @property
    def targeted(self) -> bool:
        return self.attack_values.get("target", "none") != "none"

    @property
    def threat_label(self) -> str:
        """The threat as shown in tables: ``wb``, ``bb``, ``bpda``, ``bpda-soft`` ..."""
        backward = self.threat_params.get("backward")
        if self.threat is Threat.BPDA and backward not in (None, "identity", NO_BPDA):
            return f"bpda-{backward}"
        return self.threat.short

    def describe(self) -> str:
        eps = "" if self.eps is None else f" eps={self.eps:g}"
        return f"{self.dataset.value} {self.defense_id} {self.attack_id} {self.threat_label}{eps}"


def _hash(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _bpda_params(defense: Defense, suite: Suite) -> list[dict[str, Any]]:
    if not defense.bpda_variants:
        return [{"backward": NO_BPDA}]
    chosen = dict.fromkeys(b if b in defense.bpda_variants else "identity" for b in suite.bpda["backward"])
    return [{"backward": b, **({"z": suite.bpda["soft_z"]} if b == "soft" else {})} for b in chosen]


def expand(suite: Suite) -> list[Cell]:
    """All cells of ``suite`` in evaluation order (grouped by dataset, then defense); refuses oversized grids."""
    total = count(suite)
    if total > suite.max_cells:
        raise SuiteError(suite.source, "max_cells",
                         f"the grid has {total} cells, more than max_cells = {suite.max_cells}; "
                         f"shrink the suite or raise max_cells")
    cells: dict[str, Cell] = {}
    for dataset, spec in suite.datasets.items():
        for d in (d for d in suite.defenses if dataset in d.datasets):
            defense_cls = DEFENSES.get(d.name)
            defense_values = defense_cls.resolve(d.given, dataset)
            bpda_variants = _bpda_params(defense_cls(dataset, defense_values), suite)
            for a in (a for a in suite.attacks if dataset in a.datasets):
                attack_cls = ATTACKS.get(a.name)
                attack_values = attack_cls.resolve(a.given, dataset)
                for threat in a.threats:
                    variants = bpda_variants if threat is Threat.BPDA else [{}]
                    for params in variants:
                        for eps in a.eps:
                            if attack_cls.clip_param:
                                eps = attack_values[attack_cls.clip_param]
                            cell = Cell(suite.name, dataset, spec.n, spec.sample, suite.seed, spec.train, d.name,
                                        defense_values, a.name, attack_values, threat, eps, params,
                                        suite.blackbox if threat is Threat.BLACKBOX else None)
                            cells.setdefault(cell.key, cell)
                    if suite.checks["convergence"] and attack_cls.check_convergence and threat is not Threat.BLACKBOX:
                        bounded = [e for e in a.eps if e is not None and e < 1.0]
                        if bounded:
                            doubled = {**attack_values, "steps": 2 * attack_values["steps"]}
                            for params in variants:
                                check = Cell(suite.name, dataset, spec.n, spec.sample, suite.seed, spec.train, d.name,
                                             defense_values, a.name, doubled, threat, max(bounded), params,
                                             purpose="convergence")
                                cells.setdefault(check.key, check)
    return list(cells.values())


def count(suite: Suite) -> int:
    """The number of grid cells, computed without building them (convergence checks not included)."""
    total = 0
    for dataset in suite.datasets:
        for d in (d for d in suite.defenses if dataset in d.datasets):
            cls = DEFENSES.get(d.name)
            variants = len(_bpda_params(cls(dataset, cls.resolve(d.given, dataset)), suite))
            for a in (a for a in suite.attacks if dataset in a.datasets):
                per_threat = sum(variants if t is Threat.BPDA else 1 for t in a.threats)
                total += per_threat * len(a.eps)
    return total
