"""Suite files: TOML → a validated :class:`Suite`.

Every key is checked against a declaration (the tables below for suite-level settings, each defense's and
attack's ``params`` for their entries); unknown keys, unknown names and out-of-range values raise a
:class:`SuiteError` naming the file, the key path and what was expected. A list value of a defense or attack
parameter expands into a grid (``levels = [2, 4, 6]`` is three defenses). ``include = "other.toml"`` starts
from another suite and overrides its keys (tables merge key by key, arrays are replaced).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import plugins
from bench.errors import BenchError, SuiteError
from bench.registry import Component, Param, PerDataset, _did_you_mean, _show
from bench.train import TrainConfig
from bench.types import Dataset

MAX_INCLUDE_DEPTH = 8
MAX_SUITE_BYTES = 1 << 20
MAX_NESTING = 16  # the deepest a valid suite goes is 4 (a list of lists in an attack entry of [[attacks]])
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

TOP_KEYS = ("name", "description", "seed", "include", "max_cells", "plugins", "datasets", "defenses", "attacks",
            "checks", "resilience")  # and one table per threat model that has settings ([blackbox], [bpda])

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
    Param("model", str, "", "module:callable returning your trained classifier (logits on [0, 1] inputs); the "
          "harness then trains nothing for this dataset"),
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
    model: dict[str, str] | None = None  # a user's classifier: {"ref", "file", "sha256" of its state_dict}


@dataclass(frozen=True)
class Entry:
    """One expanded defense or attack of the suite: its name and the parameters the suite set."""

    name: str
    given: dict[str, Any]
    datasets: tuple[Dataset, ...]
    eps: tuple[float | None, ...] = (None,)
    threats: tuple[str, ...] = ()


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
    threats: dict[str, dict[str, Any]]
    checks: dict[str, Any]
    resilience: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    plugins: tuple[str, ...] = ()  # plug-in modules as workers import them (absolute paths or dotted names)


def load_suite(path: str | Path) -> Suite:
    """Read, merge includes and validate the suite at ``path``; an error is reported against the file (the
    suite itself or one it includes) that set the offending key."""
    path = Path(path)
    origins: dict[tuple[str, ...], str] = {}
    raw = _read_with_includes(path, 0, origins)
    try:
        return parse(raw, str(path), default_name=path.stem, base=path.parent)
    except SuiteError as exc:
        origin = _origin(exc.path, origins)
        if origin is None or origin == str(path):
            raise
        raise SuiteError(origin, exc.path, f"{exc.detail} (in a suite included by {path})") from None


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML table of ``path``: a regular file of at most ``MAX_SUITE_BYTES`` with values nested at most
    ``MAX_NESTING`` deep (a device, a FIFO or a huge file is refused instead of read forever)."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SuiteError(source, "", f"cannot read the suite file ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SuiteError(source, "", "not a regular file (a directory, device or FIFO?); expected a TOML file")
        try:
            data = f.read(MAX_SUITE_BYTES + 1)
        except OSError as exc:
            raise SuiteError(source, "", f"cannot read the suite file ({exc.strerror or exc})") from None
    if len(data) > MAX_SUITE_BYTES:
        raise SuiteError(source, "", f"larger than {MAX_SUITE_BYTES >> 10} KiB; expected a suite file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(source, "", f"invalid TOML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise SuiteError(source, "", f"values nested deeper than {MAX_NESTING} levels") from None
    _check_nesting(raw, source)
    return raw


def _check_nesting(raw: dict[str, Any], source: str) -> None:
    """Refuse arrays and tables nested deeper than ``MAX_NESTING`` (checked without recursion)."""
    stack: list[tuple[Any, str, int]] = [(raw, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_NESTING:
            raise SuiteError(source, path, f"values nested deeper than {MAX_NESTING} levels")
        if isinstance(value, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]


def _read_with_includes(path: Path, depth: int, origins: dict[tuple[str, ...], str]) -> dict[str, Any]:
    """The suite at ``path`` merged over the suites it includes; ``origins`` maps each key path to the file
    that set it last."""
    raw = _read_toml(path)
    include = raw.pop("include", None)
    if include is not None:
        if not isinstance(include, str) or not include:
            raise SuiteError(str(path), "include", f"expected a file name (string), got {_show(include)}")
        if depth >= MAX_INCLUDE_DEPTH:
            raise SuiteError(str(path), "include", f"includes nested deeper than {MAX_INCLUDE_DEPTH} (a cycle?)")
        base = _read_with_includes(path.parent / include, depth + 1, origins)
        base.pop("name", None)
        origins.pop(("name",), None)
    _note_origins(raw, (), str(path), origins)
    return raw if include is None else _merge(base, raw)


def _note_origins(table: Mapping[str, Any], prefix: tuple[str, ...], source: str,
                  origins: dict[tuple[str, ...], str]) -> None:
    for key, value in table.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            _note_origins(value, path, source, origins)
        else:
            for stale in [p for p in origins if p[:len(path)] == path]:
                del origins[stale]
        origins[path] = source


def _origin(path: str, origins: dict[tuple[str, ...], str]) -> str | None:
    """The file that set the key at ``path`` (``attacks[0].eps``: the file that set ``attacks``)."""
    keys = tuple(re.findall(r"[^.\[\]]+", re.sub(r"\[\d+\]", "", path)))
    while keys and keys not in origins:
        keys = keys[:-1]
    return origins.get(keys) if keys else None


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


def _threats(entry: dict[str, Any], source: str, path: str) -> tuple[str, ...]:
    from bench.threats import REGISTRY as THREATS

    values = _as_list(entry.get("threat", "whitebox"))
    allowed = THREATS.names()
    if not values:
        raise SuiteError(source, f"{path}.threat", f"empty list: expected some of {', '.join(allowed)}")
    threats: list[str] = []
    for value in values:
        if value not in allowed:
            raise SuiteError(source, f"{path}.threat",
                             f"expected one of {', '.join(allowed)}, got {_show(value)}{_did_you_mean(str(value), allowed)}")
        if value in threats:
            raise SuiteError(source, f"{path}.threat", f"duplicate value {_show(value)}")
        threats.append(value)
    return tuple(threats)


def _threat_settings(raw: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Each threat model's suite table (``[blackbox]``, ``[bpda]``), validated against its ``params``; a parameter
    the threat lists in ``list_params`` takes a list (each value is a variant)."""
    from bench.threats import REGISTRY as THREATS

    settings = {}
    for cls in THREATS:
        if not cls.params:
            continue
        table = dict(_check_keys(raw.get(cls.name) or {}, tuple(p.name for p in cls.params), source, cls.name))
        listed = {}
        for name in cls.list_params:
            if name in table:
                values = _as_list(table.pop(name))
                if not values:
                    raise SuiteError(source, f"{cls.name}.{name}", f"empty list: expected {cls.param(name).describe()}")
                listed[name] = tuple(dict.fromkeys(cls.param(name).check(v, source, f"{cls.name}.{name}")
                                                   for v in values))
            else:
                listed[name] = (cls.param(name).default,)
        checked = check_table(table, tuple(p for p in cls.params if p.name not in listed), source, cls.name)
        settings[cls.name] = {**checked, **listed}
    return settings


def _refuse_duplicates(entries: list[tuple[str, Entry]], registry: Any, kind: str, source: str) -> None:
    """Two entries (or two values of one entry) that give the same resolved parameters on a dataset, at the same
    threat and eps, would be one grid cell: an error naming both, not a silent merge."""
    seen: dict[tuple[Any, ...], tuple[str, int]] = {}
    for number, (path, entry) in enumerate(entries):
        cls = registry.get(entry.name)
        for dataset in entry.datasets:
            values = cls.resolve(entry.given, dataset)
            text = json.dumps(values, sort_keys=True, default=str)
            for threat in entry.threats or (None,):
                for eps in entry.eps:
                    first = seen.setdefault((dataset, entry.name, text, threat, eps), (path, number))
                    if first[1] == number:
                        continue
                    what = " ".join([cls.make_id(values, dataset), *([threat] if threat else []),
                                     *([f"eps={eps:g}"] if eps is not None else []), f"on {dataset.value}"])
                    where = f"the same {kind} twice" if first[0] == path else f"the same {kind} as {first[0]}"
                    raise SuiteError(source, path, f"{where} ({what}); remove the duplicate")


def _plugins(raw: dict[str, Any], source: str, base: Path | None) -> tuple[str, ...]:
    """Import the suite's ``plugins`` (before its entries are checked against the registries)."""
    entries = raw.get("plugins", [])
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise SuiteError(source, "plugins", f"expected a list of .py paths or dotted module names, got {_show(entries)}")
    located = []
    for i, entry in enumerate(entries):
        try:
            located.append(plugins.plugin_location(entry, base))
            plugins.activate(located[-1:])
        except BenchError as exc:
            raise SuiteError(source, f"plugins[{i}]", str(exc)) from None
    return tuple(located)


def _user_model(ref: str, dataset: Dataset, source: str, path: str, base: Path | None) -> dict[str, str]:
    """Locate and load the user's classifier once: its file and the sha256 of its state_dict (its identity)."""
    try:
        file, _ = plugins.locate(ref, base)
        model = plugins.load_model(ref, file, dataset.shape)
    except BenchError as exc:
        raise SuiteError(source, path, str(exc)) from None
    return {"ref": ref, "file": file, "sha256": plugins.state_sha256(model)}


def parse(raw: dict[str, Any], source: str, default_name: str = "suite", base: Path | None = None) -> Suite:
    """Validate a suite already read from TOML (``include`` resolved); ``base`` is the folder where the suite's
    plug-ins and ``module:callable`` references are looked for first."""
    from bench.attacks import REGISTRY as ATTACKS
    from defenses import REGISTRY as DEFENSES

    from bench.threats import REGISTRY as THREATS

    _check_keys(raw, TOP_KEYS + tuple(c.name for c in THREATS if c.params), source, "")
    loaded = _plugins(raw, source, base)
    top = check_table({k: raw[k] for k in ("name", "description", "seed", "max_cells") if k in raw}, (
        Param("name", str, default_name, "suite name (default: file name)"),
        Param("description", str, "", "one line shown in the leaderboard header"),
        Param("seed", int, 0, "seed of training, sampling, targets and attacks", low=0, high=2**31 - 1),
        Param("max_cells", int, 10_000, "refuse grids larger than this", low=1),
    ), source, "")
    if not NAME.fullmatch(top["name"]):
        raise SuiteError(source, "name", f"expected 1 to 100 letters, digits, '-', '_' or '.', starting with a "
                         f"letter or digit (it names the results directory; default: the file name), got "
                         f"{_show(top['name'])}")

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
        model = _user_model(values["model"], dataset, source, f"datasets.{name}.model", base) if values["model"] else None
        datasets[dataset] = DatasetSpec(dataset, values["n"], values["sample"], train, model)
    available = tuple(datasets)

    defenses = []
    for i, entry in enumerate(_entries(raw, "defenses", source)):
        path = f"defenses[{i}]"
        cls = DEFENSES.get(entry["name"], source, f"{path}.name")
        on = _datasets_filter(entry, available, source, path)
        expanded = [cls.prepare(entry, given, source, path, base)
                    for given in _expand(cls, entry, ("datasets",), source, path, top["max_cells"])]
        for dataset in (d for d in on if datasets[d].model):
            for given in expanded:
                if cls(dataset, cls.resolve(given, dataset)).trains():
                    raise SuiteError(source, path, f"{cls.make_id(cls.resolve(given, dataset), dataset)} trains its "
                                     f"own classifier, but datasets.{dataset.value}.model is a trained model of yours "
                                     f"that the harness does not train; remove the defense or the model")
        defenses += [(path, Entry(cls.name, given, on)) for given in expanded]

    attacks = []
    for i, entry in enumerate(_entries(raw, "attacks", source)):
        path = f"attacks[{i}]"
        cls = ATTACKS.get(entry["name"], source, f"{path}.name")
        on = _datasets_filter(entry, available, source, path)
        eps, threats = _eps_list(entry, cls, source, path), _threats(entry, source, path)
        for threat in threats:
            refusal = THREATS.get(threat).refusal(cls)
            if refusal:
                raise SuiteError(source, f"{path}.threat", refusal)
        reserved = ("datasets", "eps", "threat")
        attacks += [(path, Entry(cls.name, given, on, eps, threats))
                    for given in _expand(cls, entry, reserved, source, path, top["max_cells"])]
    _refuse_duplicates(defenses, DEFENSES, "defense", source)
    _refuse_duplicates(attacks, ATTACKS, "attack", source)

    return Suite(
        name=top["name"], source=source, description=top["description"], seed=top["seed"],
        max_cells=top["max_cells"], datasets=datasets, defenses=tuple(e for _, e in defenses),
        attacks=tuple(e for _, e in attacks), threats=_threat_settings(raw, source),
        checks=check_table(raw.get("checks"), CHECKS_PARAMS, source, "checks"),
        resilience=check_table(raw.get("resilience"), RESILIENCE_PARAMS, source, "resilience"), raw=raw,
        plugins=loaded,
    )
