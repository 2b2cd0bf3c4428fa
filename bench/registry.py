"""Parameter declarations and name registries for defenses and attacks.

A defense or attack is a class with a ``name``, a docstring and a tuple of :class:`Param`. Registering it (the
``register`` decorator) is all it takes for suites, ``bench list`` and the runner to know it. Suite values are
checked against the declarations here, so every plug-in gets the same clear errors for free.
"""

from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Generic, TypeVar

from bench.errors import SuiteError
from bench.types import Dataset

AUTO = "auto"


@dataclass(frozen=True)
class PerDataset:
    """A default that depends on the dataset (e.g. feature squeezing uses 1 bit on MNIST, 5 on CIFAR-10)."""

    mnist: Any
    cifar10: Any

    def __getitem__(self, dataset: Dataset) -> Any:
        return getattr(self, dataset.value)

    def __str__(self) -> str:
        return f"mnist: {_fmt(self.mnist)}, cifar10: {_fmt(self.cifar10)}"


@dataclass(frozen=True)
class Param:
    """One parameter of a defense or attack, as a suite may set it.

    ``kind`` is ``int``, ``float``, ``str``, ``bool``, ``tuple`` (a pair of ints, e.g. a 2×2 window) or ``dict`` (a
    table of numbers, strings and booleans, e.g. the ``params`` of a ``custom`` defense).
    ``low``/``high`` are inclusive bounds; ``positive`` excludes zero. ``short`` is the name used in readable ids;
    ``in_id`` shows the parameter in the id even at its default (``cq(n=2,z=50)``); ``auto`` also accepts the
    string ``"auto"``; ``inference_only`` marks a defense parameter that changes evaluation but not training,
    so models that differ only in it share their trained weights; ``in_key = False`` keeps a value that does not
    change the result (where a plug-in file lies) out of cell keys; ``keyed_at_default = False`` keeps an attack
    parameter out of cell keys at its default, so adding it leaves the keys of stored cells what they were.
    """

    name: str
    kind: type
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    positive: bool = False
    choices: tuple[Any, ...] | None = None
    short: str | None = None
    in_id: bool = False
    auto: bool = False
    inference_only: bool = False
    in_key: bool = True
    keyed_at_default: bool = True

    def default_for(self, dataset: Dataset) -> Any:
        return self.default[dataset] if isinstance(self.default, PerDataset) else self.default

    def check(self, value: Any, source: str, path: str) -> Any:
        """Return ``value`` converted to this parameter's type, or raise a :class:`SuiteError` naming ``path``."""
        if self.auto and value == AUTO:
            return AUTO
        expected = self.describe()
        if self.kind is bool:
            if not isinstance(value, bool):
                raise SuiteError(source, path, f"expected {expected}, got {_show(value)}")
            return value
        if self.kind is dict:
            if not (isinstance(value, dict) and all(isinstance(k, str) and _is_scalar(v) for k, v in value.items())):
                raise SuiteError(source, path, f"expected {expected}, got {_show(value)}")
            return dict(sorted(value.items()))
        if self.kind is tuple:
            if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
                raise SuiteError(source, path, f"expected {expected}, got {_show(value)}")
            for v in value:
                self._check_range(v, source, path)
            return (int(value[0]), int(value[1]))
        if self.kind is int:
            if not _is_int(value):
                raise SuiteError(source, path, f"expected {expected}, got {_show(value)}")
            self._check_range(value, source, path)
            return int(value)
        if self.kind is float:
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise SuiteError(source, path, f"expected {expected}, got {_show(value)}")
            self._check_range(value, source, path)
            return float(value)
        if not isinstance(value, str):
            raise SuiteError(source, path, f"expected {expected}, got {_show(value)}")
        if self.choices is not None and value not in self.choices:
            raise SuiteError(source, path, f"expected {expected}, got {_show(value)}{_did_you_mean(value, self.choices)}")
        return value

    def _check_range(self, value: float, source: str, path: str) -> None:
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high) or (
            self.positive and value <= 0
        ):
            raise SuiteError(source, path, f"expected {self.describe()}, got {_show(value)}")

    def describe(self) -> str:
        """The accepted values in words, e.g. ``a number in [0, 1]``."""
        if self.choices is not None:
            text = "one of " + ", ".join(f'"{c}"' for c in self.choices)
        else:
            text = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                    tuple: "a pair of integers [h, w]",
                    dict: "a table of numbers, strings and booleans"}[self.kind]
            if self.low is not None and self.high is not None:
                text += f" in [{_fmt(self.low)}, {_fmt(self.high)}]"
            elif self.positive and self.high is not None:
                text += f" in (0, {_fmt(self.high)}]"
            elif self.positive:
                text += " > 0"
            elif self.low is not None:
                text += f" ≥ {_fmt(self.low)}"
            elif self.high is not None:
                text += f" ≤ {_fmt(self.high)}"
        return text + (' or "auto"' if self.auto else "")


class Component:
    """Base of everything a registry holds: a name, a docstring whose first line is the summary, parameters."""

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def param(cls, name: str) -> Param:
        return next(p for p in cls.params if p.name == name)

    @classmethod
    def resolve(cls, given: Mapping[str, Any], dataset: Dataset) -> dict[str, Any]:
        """All parameters: the given values over the defaults for ``dataset``, in declaration order."""
        return {p.name: given[p.name] if p.name in given else p.default_for(dataset) for p in cls.params}

    @classmethod
    def make_id(cls, values: Mapping[str, Any], dataset: Dataset) -> str:
        """Readable id: ``name(short=value,...)`` with the ``in_id`` parameters and those that differ from the
        default, e.g. ``cq(n=2,z=50)`` or ``pgd(steps=100,restarts=5)``."""
        parts = [
            f"{p.short or p.name}={_fmt(values[p.name])}"
            for p in cls.params
            if p.name in values and (p.in_id or values[p.name] != p.default_for(dataset))
        ]
        return f"{cls.name}({','.join(parts)})" if parts else cls.name


T = TypeVar("T", bound=Component)


class Registry(Generic[T]):
    """Name → class, filled by the ``register`` decorator of the modules of ``package`` and of the installed
    distributions' entry points in ``group`` (both imported on first use), and of plug-in modules a suite names
    (:mod:`bench.plugins`). ``origin(name)`` says where a class came from."""

    _loading: ClassVar[str | None] = None  # the origin of the plug-in module being imported, if any

    def __init__(self, kind: str, base: type[T], package: str, group: str | None = None) -> None:
        self.kind, self.base, self.package, self.group = kind, base, package, group
        self._items: dict[str, type[T]] = {}
        self._origins: dict[str, str] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a subclass of {self.base.__name__}")
        if cls.name in self._items and self._items[cls.name] is not cls:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice ({self.origin(cls.name)} and "
                             f"{Registry._loading or 'built-in'})")
        self._items[cls.name] = cls
        self._origins.setdefault(cls.name, Registry._loading or "built-in")
        return cls

    def origin(self, name: str) -> str:
        """``built-in``, ``plugin: PATH`` or ``entry point: DIST``."""
        return self._origins.get(name, "built-in")

    @staticmethod
    @contextmanager
    def loading(origin: str) -> Iterator[None]:
        """Classes registered inside this block come from ``origin``."""
        previous, Registry._loading = Registry._loading, origin
        try:
            yield
        finally:
            Registry._loading = previous

    def _load(self) -> None:
        if self._loaded:
            return
        package = importlib.import_module(self.package)
        with Registry.loading("built-in"):
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_") and info.name != "base":
                    importlib.import_module(f"{self.package}.{info.name}")
        self._loaded = True  # before the entry points, which may look names up while they are imported
        for entry in entry_points(group=self.group) if self.group else ():
            dist = entry.dist.name if entry.dist else entry.value
            with Registry.loading(f"entry point: {dist}"):
                try:
                    loaded = entry.load()
                except Exception as exc:  # noqa: BLE001 - a broken installed plug-in must not break the harness
                    warnings.warn(f"entry point {entry.name} = {entry.value} ({dist}) of {self.group} cannot be "
                                  f"loaded: {type(exc).__name__}: {exc}", stacklevel=2)
                    continue
                if isinstance(loaded, type) and issubclass(loaded, self.base) and loaded.name not in self._items:
                    self.register(loaded)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __iter__(self) -> Iterator[type[T]]:
        return iter(self._items[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str, source: str = "", path: str = "") -> type[T]:
        """The class registered as ``name``; an unknown name raises a SuiteError with "did you mean"."""
        self._load()
        if name not in self._items:
            known = ", ".join(self.names())
            raise SuiteError(source or "<arguments>", path or "name",
                             f"unknown {self.kind} {_show(name)}{_did_you_mean(str(name), self._items)} (known: {known})")
        return self._items[name]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, str)) or isinstance(value, float) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(name: str, options: Any) -> str:
    close = difflib.get_close_matches(name, [str(o) for o in options], n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def fmt_value(value: Any) -> str:
    """How parameter values are written in ids and tables."""
    return _fmt(value)
