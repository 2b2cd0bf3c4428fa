"""Suite files: TOML → a validated :class:`Suite`.

Every key is checked against a declaration (the tables below for suite-level settings, each defense's and
attack's ``params`` for their entries); unknown keys, unknown names and out-of-range values raise a
:class:`SuiteError` naming the file, the key path and what was expected. A list value of a defense or attack
parameter expands into a grid (``levels = [2, 4, 6]`` is three defenses). ``include = "other.toml"`` starts
from another suite and overrides its keys (tables merge key by key, arrays are replaced).
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import SuiteError
from bench.registry import Component, Param, PerDataset, _did_you_mean, _show
from bench.train import TrainConfig
from bench.types import Dataset, Threat

MAX_INCLUDE_DEPTH = 8

TOP_KEYS = ("name", "description", "seed", "include", "max_cells", "datasets", "defenses", "attacks", "blackbox",
            "bpda", "checks", "resilience")

DATASET_PARAMS = (
    Param("n", int, 1000, "test images evaluated (CIFAR-10: the first 1,000 are the exact ones)", low=1),
    Param("sample", str, "first", "which test images: the first n, or a sample drawn with the suite seed",
          choices=("first", "random")),
    Param("epochs", int, PerDataset(6, 20), "training epochs of every classifier", low=1),
    Param("batch_size", int, 128, "training batch size", low=1, high=65536),
    Param("lr", float, 1e-3, "learning rate (the peak of onecycle)", positive=True, high=10.0),
    Param("lr_schedule", str, "cosine", "learning-rate schedule over all steps",
          choices=("constant", "cosine", "step", "onecycle")),
    Param("optimizer", str, "adam", "Adam, AdamW, or SGD with Nesterov momentum 0.9", choices=("adam", "adamw", "sgd")),
    Param("weight_decay", float, 0.0, "weight decay of the optimizer (AdamW: decoupled; Adam, SGD: L2 in the gradient)",
          low=0.0, high=1.0),
    Param("label_smoothing", float, 0.0, "target = (1 - ε)·one-hot + ε/classes, in either loss", low=0.0, high=0.5),
    Param("loss", str, "ce", "training loss: cross-entropy, or squared error of softmax vs one-hot (QuSecNets eq. 2)",
          choices=("ce", "mse")),
    Param("augment", bool, PerDataset(False, True), "random flip + 4-pixel crop during training"),
    Param("train_limit", int, 0, "train on the first N training images only (0 = all)", low=0),
)

BLACKBOX_PARAMS = (
    Param("holdout", int, 150, "test images the attacker holds, disjoint from the evaluated ones", low=10, high=5000),
    Param("rounds", int, 6, "Jacobian-augmentation rounds ρ (each doubles the substitute's training set)",
          low=0, high=10),
    Param("lam", float, 0.1, "Jacobian-augmentation step λ", positive=True, high=1.0),
    Param("epochs", int, 10, "substitute training epochs per round", low=1, high=1000),
    Param("lr", float, 1e-3, "substitute Adam learning rate", positive=True, high=10.0),
    Param("oracle", str, "target", "who labels the substitute's data: the defended model itself (Papernot et al.), "
          "or the undefended model (one substitute shared by every defense of a dataset)",
          choices=("target", "undefended")),
)

BPDA_PARAMS = (
    Param("backward", str, "identity", "backward pass of gradient-masking parts: identity (straight-through) or "
          "soft (the derivative of the same sigmoid sum with steepness soft_z; CQ/TQ only)",
          choices=("identity", "soft")),
    Param("soft_z", float, 1.0, "sigmoid steepness of the soft BPDA backward", positive=True, high=1000.0),
)

CHECKS_PARAMS = (
    Param("convergence", bool, True, "re-run PGD with doubled steps at the largest eps (not-converged red flag)"),
)

RESILIENCE_PARAMS = (
    Param("eps", float, 0.3, "attack budget the quantization must absorb", positive=True, high=1.0),
    Param("noise", str, "uniform", "noise injected by the error-resilience analysis", choices=("uniform", "gaussian")),
    Param("tolerance", float, 0.01, "accuracy loss tolerated at the maximum tolerable noise", low=0.0, high=1.0),
)


@dataclass(frozen=True)
class DatasetSpec:
    dataset: Dataset
    n: int
    sample: str
    train: TrainConfig


@dataclass(frozen=True)
class Entry:
    """One expanded defense or attack of the suite: its name and the parameters the suite set."""

    name: str
    given: dict[str, Any]
    datasets: tuple[Dataset, ...]
    eps: tuple[float | None, ...] = (None,)
    threats: tuple[Threat, ...] = ()


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    description: str
    seed: int
    max_cells: int
    datasets: dict[Dataset, DatasetSpec]
    defenses: tuple[Entry, ...]
    attacks: tuple[Entry, ...]
    blackbox: dict[str, Any]
    bpda: dict[str, Any]
    checks: dict[str, Any]
    resilience: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def load_suite(path: str | Path) -> Suite:
    """Read, merge includes and validate the suite at ``path``."""
    path = Path(path)
    raw = _read_with_includes(path, 0)
    return parse(raw, str(path), default_name=path.stem)


def _read_toml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SuiteError(source, "", f"cannot read the suite file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(source, "", f"invalid TOML: {str(exc).splitlines()[0]}") from None


def _read_with_includes(path: Path, depth: int) -> dict[str, Any]:
    raw = _read_toml(path)
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise SuiteError(str(path), "include", f"expected a file name (string), got {_show(include)}")
    if depth >= MAX_INCLUDE_DEPTH:
        raise SuiteError(str(path), "include", f"includes nested deeper than {MAX_INCLUDE_DEPTH} (a cycle?)")
    base = _read_with_includes((path.parent / include), depth + 1)
    base.pop("name", None)
    return _merge(base, raw)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _check_keys(table: Any, allowed: tuple[str, ...], source: str, path: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SuiteError(source, path, f"expected a table, got {_show(table)}")
    for key in table:
        if key not in allowed:
            raise SuiteError(source, f"{path}.{key}" if path else key,
                             f"unknown key{_did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})")
    return table


def check_table(table: Any, params: tuple[Param, ...], source: str, path: str,
                dataset: Dataset | None = None) -> dict[str, Any]:
    """Validate a settings table against ``params`` and fill in the defaults."""
    table = _check_keys(table if table is not None else {}, tuple(p.name for p in params), source, path)
    out = {}
    for p in params:
        if p.name in table:
            out[p.name] = p.check(table[p.name], source, f"{path}.{p.name}" if path else p.name)
        else:
            out[p.name] = p.default_for(dataset) if dataset else p.default
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _expand(cls: type[Component], entry: dict[str, Any], reserved: tuple[str, ...], source: str,
            path: str, limit: int) -> list[dict[str, Any]]:
    """The parameter grid of one entry: every combination of the list-valued parameters."""
    names = tuple(p.name for p in cls.params)
    _check_keys(entry, ("name", *reserved, *names), source, path)
    axes: list[list[tuple[str, Any]]] = []
    for key, value in entry.items():
        if key == "name" or key in reserved:
            continue
        param = cls.param(key)
        single = not isinstance(value, list) or (param.kind is tuple and not any(isinstance(v, list) for v in value))
        options = [value] if single else value
        if not options:
            raise SuiteError(source, f"{path}.{key}", f"empty list: expected {param.describe()} or a list of them")
        axes.append([(key, param.check(v, source, f"{path}.{key}")) for v in options])
    size = 1
    for axis in axes:
        size *= len(axis)
    if size > limit:
        raise SuiteError(source, path, f"expands into {size} parameter combinations, more than max_cells = {limit}")
    return [dict(combo) for combo in itertools.product(*axes)]


def _datasets_filter(entry: dict[str, Any], available: tuple[Dataset, ...], source: str, path: str) -> tuple[Dataset, ...]:
    if "datasets" not in entry:
        return available
    names = _as_list(entry["datasets"])
    chosen = []
    for name in names:
        if name not in [d.value for d in available]:
            raise SuiteError(source, f"{path}.datasets",
                             f"{_show(name)} is not one of the suite's datasets ({', '.join(d.value for d in available)})")
        chosen.append(Dataset(name))
    if not chosen:
        raise SuiteError(source, f"{path}.datasets", "empty list: expected at least one dataset")
    return tuple(chosen)


def _entries(raw: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    entries = raw.get(key)
    if not isinstance(entries, list) or not entries:
        raise SuiteError(source, key, f"expected a non-empty array of tables [[{key}]], got {_show(entries)}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SuiteError(source, f"{key}[{i}]", f"expected a table, got {_show(entry)}")
        if not isinstance(entry.get("name"), str):
            raise SuiteError(source, f"{key}[{i}].name", f"expected a {key[:-1]} name (string), got "
                             f"{_show(entry.get('name'))}")
    return entries


def _eps_list(entry: dict[str, Any], cls: Any, source: str, path: str) -> tuple[float | None, ...]:
    if not cls.bounded:
        if "eps" in entry:
            hint = f"; bound its L∞ size with {cls.clip_param}" if cls.clip_param else ""
            raise SuiteError(source, f"{path}.eps", f"{cls.name} is a minimum-norm attack and takes no eps{hint}")
        return (None,)
    if "eps" not in entry:
        raise SuiteError(source, f"{path}.eps", "missing: expected a number in (0, 1] or a list of them")
    values = _as_list(entry["eps"])
    if not values:
        raise SuiteError(source, f"{path}.eps", "empty list: expected a number in (0, 1] or a list of them")
    eps_param = Param("eps", float, None, "", positive=True, high=1.0)
    checked = tuple(eps_param.check(v, source, f"{path}.eps") for v in values)
    if len(set(checked)) != len(checked):
        raise SuiteError(source, f"{path}.eps", "duplicate values")
    return checked


def _threats(entry: dict[str, Any], source: str, path: str) -> tuple[Threat, ...]:
    values = _as_list(entry.get("threat", "whitebox"))
    allowed = tuple(t.value for t in Threat)
    if not values:
        raise SuiteError(source, f"{path}.threat", f"empty list: expected some of {', '.join(allowed)}")
    threats = []
    for value in values:
        if value not in allowed:
            raise SuiteError(source, f"{path}.threat",
                             f"expected one of {', '.join(allowed)}, got {_show(value)}{_did_you_mean(str(value), allowed)}")
        if Threat(value) in threats:
            raise SuiteError(source, f"{path}.threat", f"duplicate value {_show(value)}")
        threats.append(Threat(value))
    return tuple(threats)


def parse(raw: dict[str, Any], source: str, default_name: str = "suite") -> Suite:
    """Validate a suite already read from TOML (``include`` resolved)."""
    from bench.attacks import REGISTRY as ATTACKS
    from defenses import REGISTRY as DEFENSES

    _check_keys(raw, TOP_KEYS, source, "")
    top = check_table({k: raw[k] for k in ("name", "description", "seed", "max_cells") if k in raw}, (
        Param("name", str, default_name, "suite name (default: file name)"),
        Param("description", str, "", "one line shown in the leaderboard header"),
        Param("seed", int, 0, "seed of training, sampling, targets and attacks", low=0, high=2**31 - 1),
        Param("max_cells", int, 10_000, "refuse grids larger than this", low=1),
    ), source, "")
    if not top["name"] or not all(c.isalnum() or c in "-_." for c in top["name"]):
        raise SuiteError(source, "name", f"expected letters, digits, '-', '_' or '.', got {_show(top['name'])}")

    tables = raw.get("datasets")
    if tables is None:
        raise SuiteError(source, "datasets", "missing: expected [datasets.mnist] and/or [datasets.cifar10]")
    _check_keys(tables, tuple(d.value for d in Dataset), source, "datasets")
    if not tables:
        raise SuiteError(source, "datasets", "expected at least one of [datasets.mnist], [datasets.cifar10]")
    datasets = {}
    for name, table in tables.items():
        dataset = Dataset(name)
        values = check_table(table, DATASET_PARAMS, source, f"datasets.{name}", dataset)
        train = TrainConfig(**{k: values[k] for k in TrainConfig.__dataclass_fields__})
        datasets[dataset] = DatasetSpec(dataset, values["n"], values["sample"], train)
    available = tuple(datasets)

    defenses = []
    for i, entry in enumerate(_entries(raw, "defenses", source)):
        path = f"defenses[{i}]"
        cls = DEFENSES.get(entry["name"], source, f"{path}.name")
        on = _datasets_filter(entry, available, source, path)
        defenses += [Entry(cls.name, given, on) for given in _expand(cls, entry, ("datasets",), source, path,
                                                                       top["max_cells"])]

    attacks = []
    for i, entry in enumerate(_entries(raw, "attacks", source)):
        path = f"attacks[{i}]"
        cls = ATTACKS.get(entry["name"], source, f"{path}.name")
        on = _datasets_filter(entry, available, source, path)
        eps, threats = _eps_list(entry, cls, source, path), _threats(entry, source, path)
        if not cls.gradient and Threat.BPDA in threats:
            raise SuiteError(source, f"{path}.threat", f"{cls.name} uses no gradients, so bpda does not apply to it")
        reserved = ("datasets", "eps", "threat")
        attacks += [Entry(cls.name, given, on, eps, threats) for given in _expand(cls, entry, reserved, source, path,
                                                                                  top["max_cells"])]

    bpda_raw = dict(raw.get("bpda") or {})
    backward = _as_list(bpda_raw.pop("backward", "identity"))
    if not backward:
        raise SuiteError(source, "bpda.backward", "empty list: expected identity and/or soft")
    bpda = check_table(bpda_raw, BPDA_PARAMS[1:], source, "bpda")
    bpda["backward"] = tuple(dict.fromkeys(BPDA_PARAMS[0].check(b, source, "bpda.backward") for b in backward))

    return Suite(
        name=top["name"], source=source, description=top["description"], seed=top["seed"],
        max_cells=top["max_cells"], datasets=datasets, defenses=tuple(defenses), attacks=tuple(attacks),
        blackbox=check_table(raw.get("blackbox"), BLACKBOX_PARAMS, source, "blackbox"), bpda=bpda,
        checks=check_table(raw.get("checks"), CHECKS_PARAMS, source, "checks"),
        resilience=check_table(raw.get("resilience"), RESILIENCE_PARAMS, source, "resilience"), raw=raw,
    )
