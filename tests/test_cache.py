"""The model cache: hit/miss by key, weights-only loading, corrupt checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bench.train import ModelCache


def _build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _train(calls: list[int]):
    def train(model: nn.Module) -> dict[str, float]:
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(0.5)
        return {"accuracy": 1.0}
    return train


def test_miss_trains_and_hit_loads(tmp_path: Path) -> None:
    cache, calls = ModelCache(tmp_path), []
    model, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _train(calls))
    assert calls == [1] and not facts["cached"]
    again, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _train(calls))
    assert calls == [1] and facts["cached"] and facts["accuracy"] == 1.0
    assert torch.equal(again.weight, torch.full((2, 3), 0.5))
    cache.get_or_train("mnist", "none", {"a": 2}, _build, _train(calls))
    assert calls == [1, 1]


def test_corrupt_checkpoint_is_moved_aside_and_retrained(tmp_path: Path) -> None:
    cache, calls = ModelCache(tmp_path), []
    cache.get_or_train("mnist", "none", {"a": 1}, _build, _train(calls))
    weights = next(tmp_path.glob("mnist/*.pt"))
    weights.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        model, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _train(calls))
    assert calls == [1, 1] and not facts["cached"]
    assert list(tmp_path.glob("mnist/*.corrupt-*"))
    assert torch.equal(model.weight, torch.full((2, 3), 0.5))


def test_pickled_code_in_a_checkpoint_is_not_loaded(tmp_path: Path) -> None:
    cache, calls = ModelCache(tmp_path), []
    cache.get_or_train("mnist", "none", {"a": 1}, _build, _train(calls))
    weights = next(tmp_path.glob("mnist/*.pt"))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    torch.save({"weight": Exploit()}, weights)
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        cache.get_or_train("mnist", "none", {"a": 1}, _build, _train(calls))
    assert not marker.exists()
