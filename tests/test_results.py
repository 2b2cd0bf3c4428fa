"""The results store: durable appends, torn lines, the one-writer lock, per-image bitmasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.errors import BenchError
from bench.results import ResultsStore, pack_mask, read_records, unpack_mask
from conftest import ROOT

REFERENCE = ROOT / "results" / "regression" / "cells.jsonl"


def record(cell_id: str, **changes: object) -> dict[str, object]:
    """A well-formed record (the first cell of the committed regression run) with another id and ``changes``."""
    first = json.loads(REFERENCE.read_text().splitlines()[0])
    return {**first, "cell_id": cell_id, "compute_id": cell_id, **changes}


def test_masks_round_trip() -> None:
    flags = np.random.default_rng(0).random(1001) < 0.5
    assert np.array_equal(unpack_mask(pack_mask(flags.tolist()), 1001), flags)
    assert len(pack_mask([True] * 1000)) == 250


def test_append_and_read(tmp_path: Path) -> None:
    with ResultsStore(tmp_path) as store:
        store.append(record("a", robust_acc=0.5))
        store.append(record("b", robust_acc=0.25))
        assert [r["cell_id"] for r in store.records()] == ["a", "b"]


def test_torn_last_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(record("a")) + "\n" + '{"cell_id": "b", "rob')
    with pytest.warns(UserWarning, match="incomplete or corrupt line"):
        assert [r["cell_id"] for r in read_records(path)] == ["a"]
    with pytest.warns(UserWarning, match="torn last line"), ResultsStore(tmp_path) as store:
        store.append(record("c"))
    assert [json.loads(line)["cell_id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_nan_is_never_written(tmp_path: Path) -> None:
    with ResultsStore(tmp_path) as store, pytest.raises(ValueError):
        store.append(record("a", l2=float("nan")))


def test_second_writer_is_refused_while_the_first_lives(tmp_path: Path) -> None:
    with ResultsStore(tmp_path), pytest.raises(BenchError, match="in use by another bench run"), \
            ResultsStore(tmp_path):
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(f"{dead.stdout.strip()}@{os.uname().nodename}")
    with ResultsStore(tmp_path) as store:
        store.append(record("a"))
    assert not (tmp_path / ".lock").exists()
