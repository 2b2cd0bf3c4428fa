"""Stored transfer craftings (bench.crafted): a second run, or another slice, of the same grid takes the
crafted examples from disk instead of crafting them again, with the same records; anything that changes the
crafting, or a damaged file, means crafting again; ``--fresh`` never reads them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import evaluate
from bench.crafted import code_digest, model_digest
from bench.models import CleverhansCNN
from bench.runner import run
from bench.settings import Settings
from bench.suite import load_suite
from bench.types import Dataset
from conftest import tiny_suite

GRID = """
[[defenses]]
name = "squeeze"
[[attacks]]
name = "pgd"
eps = 0.2
steps = 5
threat = "oblivious"
"""
VOLATILE = ("seconds", "attack_seconds")


def records(out: Path) -> dict[str, dict[str, Any]]:
    lines = (out / "cells.jsonl").read_text().splitlines()
    return {r["cell_id"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in map(json.loads, lines)}


def test_a_later_run_reuses_stored_craftings_with_the_same_records(tmp_path: Path, data_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=100, eps="[0.2]", extra=GRID))
    cache = tmp_path / "cache"
    settings = Settings(data_dir=str(data_dir), cache_dir=str(cache))
    calls: list[int] = []
    real = evaluate.craft

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "craft", counted)
    whole = tmp_path / "whole"
    assert run(suite, whole, settings, progress=False).exit_code == 0
    first = len(calls)  # fgsm wb and bpda on none, pgd oblivious crafted once for both defenses
    stored = list((cache / "mnist" / "crafted").glob("*.pt"))
    assert len(stored) == 1
    calls.clear()
    sliced = tmp_path / "sliced"
    for defense in ("squeeze", "none"):  # two slices, two processes' worth of contexts
        assert run(suite, sliced, settings, progress=False, only=[f"defense={defense}*"]).exit_code == 0
    assert len(calls) == first - 1  # the oblivious crafting was read from disk by both slices
    assert records(sliced) == records(whole)
    calls.clear()
    assert run(suite, tmp_path / "fresh", settings, progress=False, fresh=True).exit_code == 0
    assert len(calls) == first  # --fresh pays for every crafting
    stored[0].write_bytes(b"damaged")
    calls.clear()
    with pytest.warns(UserWarning, match="stored crafting not used"):
        assert run(suite, tmp_path / "again", settings, progress=False).exit_code == 0
    assert len(calls) == first and records(tmp_path / "again") == records(whole)


def test_the_key_changes_with_the_weights_and_with_a_plug_ins_source(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = CleverhansCNN(Dataset.MNIST.shape)
    before = model_digest(model)
    with torch.no_grad():
        next(model.parameters())[0] += 1e-6
    assert model_digest(model) != before
    plugin = tmp_path / "my_attack.py"
    plugin.write_text("class Mine:\n    pass\n")
    spec = importlib.util.spec_from_file_location("my_attack", plugin)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_attack", module)  # as an imported plug-in is
    spec.loader.exec_module(module)
    digest = code_digest(module.Mine(), model)
    assert digest != code_digest(model)
    plugin.write_text("class Mine:\n    x = 1\n")
    assert code_digest(module.Mine(), model) != digest
