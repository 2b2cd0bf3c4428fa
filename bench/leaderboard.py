"""The leaderboard: a pure function from cell records to markdown (and a flat CSV). It computes nothing that is
not in the records: worst cases come from the stored per-image masks, red flags from :mod:`bench.flags`.

Per dataset, one table: rows are defenses, columns are clean accuracy, each attack × threat × eps, the
per-image worst case at each L∞ eps (an image counts only if it survives every attack run on that defense
within that eps) and over all attacks, and the red-flag column with footnoted evidence. Rows are sorted by the
worst case at the largest eps below 1 (the headline budget), then by the overall worst case.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import flags as flags_mod
from bench import plots
from bench.results import check_compatible, read_records, unpack_mask, write_text

MASK_FIELDS = ("clean_mask", "robust_mask", "detected_mask")


def last_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell id (the last written), in first-seen order."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id.pop(r["cell_id"], None)
        by_id[r["cell_id"]] = r
    return list(by_id.values())


def column(r: dict[str, Any]) -> str:
    eps = "" if r["eps"] is None else f" {r['eps']:g}"
    return f"{r['attack']} {r['threat_label']}{eps}"


def worst_case(cells: Sequence[dict[str, Any]], max_eps: float | None) -> float | None:
    """Fraction of images correct under every attack in ``cells`` (within L∞ ``max_eps``; None: all attacks)."""
    chosen = [r for r in cells if max_eps is None or (r["eps"] is not None and r["norm"] == "linf"
                                                      and r["eps"] <= max_eps)]
    if not chosen:
        return None
    n = chosen[0]["n"]
    survived = np.ones(n, dtype=bool)
    for r in chosen:
        survived &= unpack_mask(r["robust_mask"], n)
    return float(survived.mean())


def headline_eps(records: Sequence[dict[str, Any]]) -> float | None:
    bounded = [r["eps"] for r in records if r["eps"] is not None and r["norm"] == "linf" and r["eps"] < 1.0]
    return max(bounded, default=None)


def tables(records: Iterable[dict[str, Any]]) -> dict[str, tuple[pd.DataFrame, list[flags_mod.Flag]]]:
    """Per dataset: the leaderboard as a DataFrame (fractions, None for missing) and its red flags."""
    latest = last_records(records)
    raised = flags_mod.compute(latest)
    result = {}
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in latest:
        by_dataset[r["dataset"]].append(r)
    for dataset, recs in by_dataset.items():
        grid = [r for r in recs if r.get("purpose", "grid") == "grid"]
        ok = [r for r in recs if r.get("error") is None]
        eps_values = sorted({r["eps"] for r in ok if r["eps"] is not None and r["norm"] == "linf"})
        headline = headline_eps(ok)
        columns = list(dict.fromkeys(column(r) for r in sorted(grid, key=_column_order)))
        rows = []
        for defense in dict.fromkeys(r["defense"] for r in recs):
            mine = [r for r in grid if r["defense"] == defense]
            mine_ok = [r for r in ok if r["defense"] == defense]
            row: dict[str, Any] = {"defense": defense,
                                   "clean": mine_ok[0]["clean_acc"] if mine_ok else None}
            for r in mine:
                row[column(r)] = "error" if r.get("error") else r["robust_acc"]
            for eps in eps_values:
                row[f"worst {eps:g}"] = worst_case(mine_ok, eps)
            row["worst"] = worst_case(mine_ok, None)
            detected = [r["detected_acc"] for r in mine_ok if "detected_acc" in r]
            if detected:
                row["detected (min)"] = min(detected)
            row["flags"] = ", ".join(dict.fromkeys(f.code for f in raised if f.dataset == dataset and
                                                   f.defense == defense))
            rows.append(row)
        frame = pd.DataFrame(rows, columns=["defense", "clean", *columns, *(f"worst {e:g}" for e in eps_values),
                                            "worst", *(["detected (min)"] if any("detected (min)" in r for r in rows)
                                                       else []), "flags"])
        sort_by = [c for c in (f"worst {headline:g}" if headline is not None else None, "worst") if c]
        frame = frame.sort_values(sort_by, ascending=False, na_position="last", kind="stable").reset_index(drop=True)
        result[dataset] = (frame, [f for f in raised if f.dataset == dataset])
    return result


def _column_order(r: dict[str, Any]) -> tuple[Any, ...]:
    threat_order = {"whitebox": 0, "bpda": 1, "blackbox": 2}
    return (r["attack_name"], r["attack"], threat_order.get(r["threat"], 9), r["threat_label"],
            -1 if r["eps"] is None else r["eps"])


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def render(records: Iterable[dict[str, Any]]) -> str:
    """The whole ``leaderboard.md`` for ``records``."""
    records = list(records)
    if not records:
        return "# Leaderboard\n\nNo cells yet.\n"
    suites = ", ".join(dict.fromkeys(r["suite"] for r in records))
    lines = [f"# Leaderboard: {suites}", "",
             "Accuracy in % on the evaluated test images (higher is better for the defense). Columns: attack, "
             "threat (wb = white-box, bb = black-box transfer from a substitute, bpda = white-box through the "
             "defense with a differentiable backward approximation), eps (L∞, [0, 1] pixel scale). `worst e`: "
             "per image, correct under every attack within eps e; `worst`: under every attack run. Rows are "
             "sorted by the worst case. Flags are explained in docs/flags.md.", ""]
    for dataset, (frame, raised) in tables(records).items():
        recs = [r for r in records if r["dataset"] == dataset]
        provenance = next((r["data_provenance"] for r in recs if r.get("data_provenance")), "unknown")
        n = sorted({r["n"] for r in recs})
        revisions = sorted({str(r.get("git")) for r in recs})
        lines += [f"## {dataset}", "",
                  f"- data: {provenance}", f"- evaluated images: {', '.join(map(str, n))}",
                  f"- harness version {recs[0].get('version')}, git {', '.join(revisions)}", ""]
        notes: list[str] = []
        display = frame.copy()
        for i, row in display.iterrows():
            marks: dict[str, str] = {}
            for flag in (f for f in raised if f.defense == row["defense"]):
                notes.append(f"{flag.defense} `{flag.code}`: {flag.evidence}")
                marks[flag.code] = marks.get(flag.code, flag.code) + f"[^{dataset}-{len(notes)}]"
            display.at[i, "flags"] = ", ".join(marks.values())
        display = display.map(_fmt)
        lines.append(display.to_markdown(index=False, disable_numparse=True))
        lines.append("")
        errors = [r for r in recs if r.get("error")]
        if errors:
            lines.append(f"{len(errors)} cell(s) failed: " + "; ".join(
                f"{r['defense']} {column(r)}: {r['error']}" for r in errors))
            lines.append("")
        lines += [f"[^{dataset}-{i}]: {note}" for i, note in enumerate(notes, 1)]
        if notes:
            lines.append("")
    return "\n".join(lines)


def csv_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """All records flat, without the per-image masks; parameter dicts as JSON text."""
    rows = []
    for r in last_records(records):
        row = {k: v for k, v in r.items() if k not in MASK_FIELDS}
        for k, v in row.items():
            if isinstance(v, dict | list):
                row[k] = json.dumps(v, sort_keys=True)
        rows.append(row)
    return pd.DataFrame(rows)


def write(out: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """(Re-)render ``out/leaderboard.md``, ``out/cells.csv`` and the record-based figures in ``out/plots`` from
    ``out/cells.jsonl`` (or ``records``)."""
    out = Path(out)
    if records is None:
        records = read_records(out / "cells.jsonl")
    check_compatible(last_records(records), str(out / "cells.jsonl"))
    write_text(out / "leaderboard.md", render(records))
    write_text(out / "cells.csv", csv_frame(records).to_csv(index=False))
    plots.write(last_records(records), out / "plots")
    return out / "leaderboard.md"
