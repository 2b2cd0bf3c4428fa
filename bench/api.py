"""The Python API: evaluate your own defense (and/or your own trained model) as ``bench run`` would.

``evaluate`` builds a suite in memory (the same validation as a suite file) and runs it through
:func:`bench.runner.run`, so records, resume and leaderboard are those of the command line::

    from bench.api import evaluate
    records, leaderboard = evaluate(preprocess="my_defense:build", attacks=["fgsm", "pgd"], eps=[0.1, 0.3],
                                    threats=["whitebox", "bpda"], n=200)
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.attacks import REGISTRY as ATTACKS
from bench.errors import BenchError
from bench.results import read_records
from bench.runner import run
from bench.settings import Settings
from bench.suite import Suite, parse
from bench.threats import REGISTRY as THREATS

Ref = str | Callable[..., Any]


def _ref(value: Ref, what: str) -> tuple[str, Path | None]:
    """A ``"module:callable"`` string as given, or a module-level function → (its reference, folder to search)."""
    if isinstance(value, str):
        return value, None
    module = sys.modules.get(getattr(value, "__module__", "") or "")
    file = getattr(module, "__file__", None)
    name = getattr(value, "__qualname__", "")
    if module is None or file is None or not name or "<" in name:
        raise BenchError(f"{what}: expected 'module:callable' or a function defined at the top level of a module file")
    if module.__name__ in ("__main__", Path(file).stem):
        return f"{Path(file).stem}:{name}", Path(file).parent
    return f"{module.__name__}:{name}", None


def build_suite(model: Ref | None = None, preprocess: Ref | None = None, dataset: str = "mnist",
                attacks: Sequence[str] = ("fgsm", "pgd"), eps: Sequence[float] = (0.1, 0.3),
                threats: Sequence[str] = ("whitebox", "bpda"), n: int = 200, *, retrain: bool = True,
                params: dict[str, Any] | None = None, name: str = "api", seed: int = 0,
                training: dict[str, Any] | None = None) -> Suite:
    """The in-memory suite of :func:`evaluate`: the undefended baseline and, with ``preprocess``, the custom
    defense; each attack under each of ``threats`` it supports."""
    bases = []
    table: dict[str, Any] = {"n": n, **(training or {})}
    if model is not None:
        table["model"], base = _ref(model, "model")
        bases.append(base)
    defenses: list[dict[str, Any]] = [{"name": "none"}]
    if preprocess is not None:
        ref, base = _ref(preprocess, "preprocess")
        bases.append(base)
        defenses.append({"name": "custom", "preprocess": ref, "retrain": retrain, "params": params or {}})
    entries = []
    for attack in attacks:
        cls = ATTACKS.get(attack)
        usable = [t for t in threats if THREATS.get(t).refusal(cls) is None]
        entries.append({"name": attack, "threat": usable, **({"eps": list(eps)} if cls.bounded else {})})
    found = {b for b in bases if b is not None}
    if len(found) > 1:
        raise BenchError(f"model and preprocess come from different folders ({', '.join(map(str, found))}); "
                         f"pass 'module:callable' strings importable from sys.path instead")
    raw = {"name": name, "seed": seed, "datasets": {dataset: table}, "defenses": defenses, "attacks": entries}
    return parse(raw, "<bench.api.evaluate>", default_name=name, base=next(iter(found), Path.cwd()))


def evaluate(model: Ref | None = None, preprocess: Ref | None = None, dataset: str = "mnist",
             attacks: Sequence[str] = ("fgsm", "pgd"), eps: Sequence[float] = (0.1, 0.3),
             threats: Sequence[str] = ("whitebox", "bpda"), n: int = 200, out: str | Path | None = None, *,
             retrain: bool = True, params: dict[str, Any] | None = None, settings: Settings | None = None,
             training: dict[str, Any] | None = None, suite: Suite | None = None,
             progress: bool = False) -> tuple[pd.DataFrame, str]:
    """Run the grid as ``bench run`` does and return (one row per cell record, the leaderboard markdown).

    ``model`` / ``preprocess``: ``"module:callable"`` (found in the current folder first, then on sys.path) or a
    module-level function. ``training`` sets ``[datasets.<dataset>]`` keys (e.g. ``{"epochs": 1}``); ``suite``
    runs a suite already loaded instead (e.g. :func:`bench.suite.load_suite`). ``out`` keeps the results
    directory (resumable); without it they go to a temporary one.
    """
    suite = suite or build_suite(model, preprocess, dataset, attacks, eps, threats, n, retrain=retrain,
                                 params=params, training=training)
    settings = settings or Settings()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as scratch:
        target = Path(out) if out is not None else Path(scratch)
        summary = run(suite, target, settings, progress=progress)
        if summary.interrupted:
            raise KeyboardInterrupt
        records = read_records(target / "cells.jsonl")
        text = (target / "leaderboard.md").read_text()
    return pd.DataFrame(records), text
