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
import re
from dataclasses import asdict, dataclass, field, replace
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

from bench.attacks import REGISTRY as ATTACKS
from bench.errors import BenchError, SuiteError
from bench.registry import AUTO
from bench.suite import Suite
from bench.threats import REGISTRY as THREATS
from bench.train import TrainConfig, config_dict
from bench.types import Dataset
from defenses import REGISTRY as DEFENSES

# Bumped when the scoring of cells changes: part of every cell key, so records scored the old way are recomputed,
# never resumed. 1: robust and success conditioned on clean correctness (AutoAttack's convention).
SCORING_REVISION = 1


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
    threat: str
    eps: float | None
    threat_params: dict[str, Any] = field(default_factory=dict)
    purpose: str = "grid"
    keep_examples: bool = False
    resilience: dict[str, Any] | None = None  # the [resilience] settings, for a defense with levels = "auto"
    model: dict[str, str] | None = None  # a user's trained classifier: {"ref", "file", "sha256"} (None: the CNN)

    def spec(self) -> dict[str, Any]:
        """Everything that determines the cell's result, as JSON-able data."""
        data = asdict(self)
        data["dataset"] = self.dataset.value
        data["train"] = config_dict(self.train)  # training settings added later stay out of the key at their defaults
        data["defense_values"] = self.defense_params
        for p in ATTACKS.get(self.attack).params:
            if not p.keyed_at_default and self.attack_values.get(p.name) == p.default_for(self.dataset):
                del data["attack_values"][p.name]
        del data["suite"], data["purpose"], data["keep_examples"]
        if self.resilience is None:  # absent unless levels = "auto", so other keys stay what they were
            del data["resilience"]
        if self.model is None:
            del data["model"]
        else:
            data["model"] = {k: v for k, v in self.model.items() if k != "file"}
        revision = ATTACKS.get(self.attack).key_revision(self.attack_values)
        if revision:  # absent at 0, so the keys of adapters never revised stay what they were
            data["attack_revision"] = revision
        data["scoring"] = SCORING_REVISION
        return data

    @property
    def defense_params(self) -> dict[str, Any]:
        """The defense's values as keyed and recorded: JSON-able, without machine-local ones (``in_key=False``,
        e.g. the path of a custom defense's file, whose content its sha256 already names)."""
        local = {p.name for p in DEFENSES.get(self.defense).params if not p.in_key}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.defense_values.items() if k not in local}

    @cached_property
    def key(self) -> str:
        return _hash(self.spec())

    @cached_property
    def compute_key(self) -> str:
        """Equal for cells that are one computation (``bpda`` without anything to approximate = ``whitebox``)."""
        if THREATS.get(self.threat).same_as_whitebox(self.threat_params):
            return replace(self, threat="whitebox", threat_params={}).key
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
        """The threat as shown in tables: ``wb``, ``bb``, ``bpda``, ``bpda-soft``, ``obl`` ..."""
        return THREATS.get(self.threat).label(self.threat_params)

    def describe(self) -> str:
        eps = "" if self.eps is None else f" eps={self.eps:g}"
        return f"{self.dataset.value} {self.defense_id} {self.attack_id} {self.threat_label}{eps}"


SELECT_FIELDS = ("dataset", "defense", "attack", "threat", "eps")


def _names(cell: Cell, field_name: str) -> tuple[str, ...]:
    """What ``--only FIELD=...`` matches for a cell: the name and the id (or label) as tables show them."""
    return {
        "dataset": (cell.dataset.value,),
        "defense": (cell.defense, cell.defense_id),
        "attack": (cell.attack, cell.attack_id),
        "threat": (cell.threat, cell.threat_label),
        "eps": ("none" if cell.eps is None else f"{cell.eps:g}",),
    }[field_name]


_PATTERN_COMMA = re.compile(r",(?!\w+=)")


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """The cells matching every ``FIELD=PATTERN[,PATTERN...]`` of ``only`` (shell wildcards; a field matches when
    any pattern matches its name or id, e.g. ``defense=cq`` or ``defense=cq(n=2*``, ``eps=0.1,0.3``). A comma
    followed by ``name=`` belongs to the pattern, so a whole id as the tables print it (``defense=cq(n=2,z=50)``,
    ``defense=dqa(bits=2,mode=fixed*``) is one pattern."""
    chosen = cells
    for item in only:
        field_name, sep, patterns = item.partition("=")
        if not sep or field_name not in SELECT_FIELDS or not patterns:
            raise BenchError(f"--only {item}: expected FIELD=PATTERN[,PATTERN...] with FIELD one of "
                             f"{', '.join(SELECT_FIELDS)}")
        wanted = _PATTERN_COMMA.split(patterns)
        chosen = [c for c in chosen if any(fnmatchcase(name, pattern) for name in _names(c, field_name)
                                           for pattern in wanted)]
    if not chosen:
        raise BenchError(f"--only {' --only '.join(only)} selects none of the suite's {len(cells)} cells")
    return chosen


def _hash(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _variants(suite: Suite, dataset: Dataset, defense: str, values: dict[str, Any],
              threat: str) -> list[dict[str, Any]]:
    return THREATS.get(threat).variants(DEFENSES.get(defense)(dataset, values), suite.threats.get(threat, {}))


def expand(suite: Suite) -> list[Cell]:
    """All cells of ``suite`` in evaluation order (grouped by dataset, then defense); refuses oversized grids.

    Convergence checks (doubled steps at the largest eps) are added for attacks that ask for them; the cells of
    the first untargeted L∞ gradient attack under ``whitebox`` at its largest eps below 1 keep a few adversarial
    examples for the example sheet.
    """
    total = count(suite)
    if total > suite.max_cells:
        raise SuiteError(suite.source, "max_cells",
                         f"the grid has {total} cells, more than max_cells = {suite.max_cells}; "
                         f"shrink the suite or raise max_cells")
    cells: dict[str, Cell] = {}
    for dataset, spec in suite.datasets.items():
        sheet = _sheet_attack(suite, dataset)
        for d in (d for d in suite.defenses if dataset in d.datasets):
            defense_values = DEFENSES.get(d.name).resolve(d.given, dataset)
            auto = suite.resilience if defense_values.get("levels") == AUTO else None
            for a in (a for a in suite.attacks if dataset in a.datasets):
                attack_cls = ATTACKS.get(a.name)
                attack_values = attack_cls.resolve(a.given, dataset)
                for threat in a.threats:
                    variants = _variants(suite, dataset, d.name, defense_values, threat)
                    for params in variants:
                        for eps in a.eps:
                            if attack_cls.clip_param:
                                eps = attack_values[attack_cls.clip_param]
                            examples = threat == "whitebox" and a is sheet and eps == _sheet_eps(a)
                            cell = Cell(suite.name, dataset, spec.n, spec.sample, suite.seed, spec.train, d.name,
                                        defense_values, a.name, attack_values, threat, eps, params,
                                        keep_examples=examples, resilience=auto, model=spec.model)
                            cells.setdefault(cell.key, cell)
                    if (suite.checks["convergence"] and attack_cls.check_convergence
                            and not THREATS.get(threat).transfer):
                        bounded = [e for e in a.eps if e is not None and e < 1.0]
                        if bounded:
                            doubled = {**attack_values, "steps": 2 * attack_values["steps"]}
                            for params in variants:
                                check = Cell(suite.name, dataset, spec.n, spec.sample, suite.seed, spec.train, d.name,
                                             defense_values, a.name, doubled, threat, max(bounded), params,
                                             purpose="convergence", resilience=auto, model=spec.model)
                                cells.setdefault(check.key, check)
    return list(cells.values())


def _sheet_attack(suite: Suite, dataset: Dataset) -> Any:
    """The suite entry whose white-box examples the example sheet shows: the first untargeted L∞ gradient attack
    with an eps below 1."""
    for a in suite.attacks:
        cls = ATTACKS.get(a.name)
        values = cls.resolve(a.given, dataset)
        if (dataset in a.datasets and "whitebox" in a.threats and cls.gradient and cls.bounded
                and cls.bound_norm() == "linf" and values.get("target", "none") == "none"
                and any(e < 1.0 for e in a.eps)):
            return a
    return None


def _sheet_eps(entry: Any) -> float:
    return max(e for e in entry.eps if e < 1.0)


def count(suite: Suite) -> int:
    """The number of grid cells, computed without building them (convergence checks not included)."""
    total = 0
    for dataset in suite.datasets:
        for d in (d for d in suite.defenses if dataset in d.datasets):
            values = DEFENSES.get(d.name).resolve(d.given, dataset)
            for a in (a for a in suite.attacks if dataset in a.datasets):
                per_threat = sum(len(_variants(suite, dataset, d.name, values, t)) for t in a.threats)
                total += per_threat * len(a.eps)
    return total
