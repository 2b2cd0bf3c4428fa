"""``bench compare``: check a run's cells against reference cells (regression checks) within tolerances."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.results import read_records


@dataclass(frozen=True)
class Drift:
    cell: str
    problem: str


def _describe(r: dict[str, Any]) -> str:
    eps = "" if r.get("eps") is None else f" eps={r['eps']:g}"
    return f"{r['dataset']} {r['defense']} {r['attack']} {r['threat_label']}{eps}"


def compare(run: list[dict[str, Any]], reference: list[dict[str, Any]], clean_tol: float,
            robust_tol: float) -> list[Drift]:
    """Every reference cell must be in ``run`` (its last record), without error, with accuracies within the
    tolerances."""
    by_id = {r["cell_id"]: r for r in run}
    drifts = []
    for ref in reference:
        name = _describe(ref)
        got = by_id.get(ref["cell_id"])
        if got is None:
            drifts.append(Drift(name, "missing from the run"))
            continue
        if got.get("error"):
            drifts.append(Drift(name, f"failed: {got['error']}"))
            continue
        for field, tol in (("clean_acc", clean_tol), ("robust_acc", robust_tol)):
            if abs(got[field] - ref[field]) > tol + 1e-9:
                drifts.append(Drift(name, f"{field} {100 * got[field]:.1f}% vs reference {100 * ref[field]:.1f}% "
                                          f"(tolerance {100 * tol:.1f} points)"))
    return drifts


def load_dir(path: str | Path) -> list[dict[str, Any]]:
    cells = Path(path) / "cells.jsonl"
    if not cells.is_file():
        raise BenchError(f"{cells} does not exist")
    return read_records(cells)


def load_reference(path: str | Path) -> list[dict[str, Any]]:
    """The reference cells: the last record of each cell that did not fail. A reference without any is refused,
    since every run would match it."""
    latest = {r["cell_id"]: r for r in load_dir(path)}
    reference = [r for r in latest.values() if r.get("error") is None]
    if not reference:
        raise BenchError(f"{Path(path) / 'cells.jsonl'} holds no successful cell records: nothing to compare against")
    return reference
