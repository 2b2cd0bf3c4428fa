"""The leaderboard: a pure function from cell records to markdown (and a flat CSV). It computes nothing that is
not in the records: worst cases come from the stored per-image masks, red flags from :mod:`bench.flags`.

Per dataset, a headline table first (defense, clean accuracy, the per-image worst case at each L∞ eps, flags),
RobustBench style, sorted by the worst case at the main eps (the largest L∞ eps below 1); then the detailed table:
rows are defenses, columns are clean accuracy, each attack × threat × eps, the worst case at each eps and over
every bounded attack, sanity-check cells (eps ≥ 1, which never enter a worst case) and the red-flag column with
footnoted evidence; then, for ensembles such as AutoAttack, what each component left standing.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import flags as flags_mod
from bench import plots, sheet
from bench.errors import BenchError
from bench.results import check_compatible, read_records, unpack_mask, write_text

MASK_FIELDS = ("clean_mask", "robust_mask", "detected_mask", "examples")
PLAN = "plan.json"  # written by bench run: the cell ids of the suite's grid, so a partial run says so
SANITY_EPS = 1.0  # cells at eps ≥ this are sanity checks (every image can become any other)


def last_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per cell id (the last written), in first-seen order; refuses a record whose robust images are
    not a subset of its clean-correct ones (robust ⊆ clean is the scoring's invariant)."""
    by_id: dict[str, dict[str, Any]] = {}
    for r in records:
        by_id.pop(r["cell_id"], None)
        by_id[r["cell_id"]] = r
    for r in by_id.values():
        check_robust_within_clean(r)
    return list(by_id.values())


def check_robust_within_clean(r: dict[str, Any]) -> None:
    """Raise a :class:`BenchError` naming the cell when an image counts as robust but not as clean-correct."""
    if r.get("error") is not None or "robust_mask" not in r or "clean_mask" not in r:
        return
    n = r["n"]
    robust, clean = unpack_mask(r["robust_mask"], n), unpack_mask(r["clean_mask"], n)
    if (robust & ~clean).any() or (r["robust_acc"] is not None and r["robust_acc"] > r["clean_acc"] + 1e-9):
        raise BenchError(f"cell {r['cell_id']} ({r['dataset']} {r['defense']} {column(r)}) counts "
                         f"{int((robust & ~clean).sum())} image(s) as robust that are misclassified clean: it was "
                         f"scored before clean-conditioned scoring (run the suite again to recompute it)")


def column(r: dict[str, Any]) -> str:
    eps = "" if r["eps"] is None else f" {r['eps']:g}"
    return f"{r['attack']} {r['threat_label']}{eps}"


def is_sanity(r: dict[str, Any]) -> bool:
    return r["eps"] is not None and r["eps"] >= SANITY_EPS


def worst_case(cells: Sequence[dict[str, Any]], max_eps: float | None) -> float | None:
    """Fraction of images correct clean and under every attack in ``cells`` within L∞ ``max_eps`` (None: every
    bounded attack below the sanity budget); minimum-norm attacks without a bound and sanity cells never count."""
    return survivors(within(cells, max_eps))


def within(cells: Sequence[dict[str, Any]], max_eps: float | None) -> list[dict[str, Any]]:
    """The cells of :func:`worst_case` for ``max_eps``."""
    return [r for r in cells if r["eps"] is not None and not is_sanity(r)
            and (max_eps is None or (r["norm"] == "linf" and r["eps"] <= max_eps))]


def survivor_mask(cells: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per image: correct clean and under every one of ``cells`` (non-empty, same images)."""
    n = cells[0]["n"]
    survived = np.ones(n, dtype=bool)
    for r in cells:
        survived &= unpack_mask(r["robust_mask"], n) & unpack_mask(r["clean_mask"], n)
    return survived


def survivors(cells: Sequence[dict[str, Any]]) -> float | None:
    """Fraction of images correct clean and under every one of ``cells`` (same images), None for no cells."""
    return float(survivor_mask(cells).mean()) if cells else None


def headline_eps(records: Sequence[dict[str, Any]]) -> float | None:
    bounded = [r["eps"] for r in records if r["eps"] is not None and r["norm"] == "linf" and not is_sanity(r)]
    return max(bounded, default=None)


def tables(records: Iterable[dict[str, Any]]) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, list[flags_mod.Flag]]]:
    """Per dataset: the headline table, the detailed table (fractions, None for missing) and the red flags."""
    latest = last_records(records)
    raised = flags_mod.compute(latest)
    result = {}
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in latest:
        by_dataset[r["dataset"]].append(r)
    for dataset, recs in by_dataset.items():
        grid = [r for r in recs if r.get("purpose", "grid") == "grid"]
        ok = [r for r in recs if r.get("error") is None]
        eps_values = sorted({r["eps"] for r in ok if r["eps"] is not None and r["norm"] == "linf"
                             and not is_sanity(r)})
        headline = headline_eps(ok)
        ordered = sorted(grid, key=_column_order)
        columns = list(dict.fromkeys(column(r) for r in ordered if not is_sanity(r)))
        sanity = list(dict.fromkeys(f"{column(r)} (sanity)" for r in ordered if is_sanity(r)))
        rows = []
        for defense in dict.fromkeys(r["defense"] for r in recs):
            mine = [r for r in grid if r["defense"] == defense]
            mine_ok = [r for r in ok if r["defense"] == defense]
            row: dict[str, Any] = {"defense": defense, "clean": mine_ok[0]["clean_acc"] if mine_ok else None}
            for r in mine:
                name = f"{column(r)} (sanity)" if is_sanity(r) else column(r)
                row[name] = "error" if r.get("error") else r["robust_acc"]
            for eps in eps_values:
                row[f"worst {eps:g}"] = worst_case(mine_ok, eps)
            row["worst"] = worst_case(mine_ok, None)
            detected = [r["detected_acc"] for r in mine_ok if "detected_acc" in r]
            if detected:
                row["detected (min)"] = min(detected)
            row["flags"] = ", ".join(dict.fromkeys(f.code for f in raised if f.dataset == dataset and
                                                   f.defense == defense))
            rows.append(row)
        worst_columns = [f"worst {e:g}" for e in eps_values]
        detail = pd.DataFrame(rows, columns=["defense", "clean", *columns, *worst_columns, "worst", *sanity,
                                             *(["detected (min)"] if any("detected (min)" in r for r in rows)
                                               else []), "flags"])
        sort_by = [c for c in (f"worst {headline:g}" if headline is not None else None, "worst") if c]
        detail = detail.sort_values(sort_by, ascending=False, na_position="last", kind="stable").reset_index(drop=True)
        head = detail[["defense", "clean", *worst_columns, "flags"]].copy()
        result[dataset] = (head, detail, [f for f in raised if f.dataset == dataset])
    return result


def _column_order(r: dict[str, Any]) -> tuple[Any, ...]:
    threat_order = {"whitebox": 0, "bpda": 1, "quantized": 2, "blackbox": 3, "oblivious": 4}
    return (r["attack_name"], r["attack"], threat_order.get(r["threat"], 9), r["threat_label"],
            -1 if r["eps"] is None else r["eps"])


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def _components(recs: list[dict[str, Any]]) -> list[str]:
    """Per ensemble cell: the accuracy left standing after each of its components, in order."""
    rows = [[r["defense"], column(r), *(f"{c['attack']} {_fmt(c['robust_acc'])}" for c in r["components"])]
            for r in recs if r.get("components") and r.get("error") is None]
    if not rows:
        return []
    width = max(len(r) for r in rows)
    header = ["defense", "cell", *(f"after stage {i}" for i in range(1, width - 1))]
    frame = pd.DataFrame([r + [""] * (width - len(r)) for r in rows], columns=header)
    return ["Ensemble components (accuracy left standing after each stage, run only on the images still robust):",
            "", frame.to_markdown(index=False, disable_numparse=True), ""]


def render(records: Iterable[dict[str, Any]], planned: set[str] | None = None) -> str:
    """The whole ``leaderboard.md`` for ``records``; ``planned``: the cell ids of the whole grid, when known."""
    records = list(records)
    if not records:
        return "# Leaderboard\n\nNo cells yet.\n"
    suites = ", ".join(dict.fromkeys(r["suite"] for r in records))
    done = {r["cell_id"] for r in records if r.get("error") is None}
    missing = len(planned - done) if planned else 0
    partial = ([f"**Partial: {len(planned) - missing} of {len(planned)} cells.** The run has not finished; worst "
                "cases and flags cover the finished cells only.", ""] if missing else [])
    lines = [f"# Leaderboard: {suites}", "", *partial,
             "Accuracy in % on the evaluated test images (higher is better for the defense); an image counts only "
             "if it is classified correctly clean *and* after the attack (AutoAttack's convention). Threats: wb = "
             "white-box, bpda = white-box through the defense with a differentiable backward approximation, qs = "
             "the classifier attacked on the quantized values the eps ball reaches (CQ/TQ), bb = black-box "
             "transfer from a substitute, obl = oblivious (crafted on the undefended model). eps is L∞ "
             "in the [0, 1] pixel scale. `worst e`: per image, correct under every attack within eps e; `worst`: "
             "under every bounded attack; sanity cells (eps ≥ 1) enter no worst case. Flags are explained in "
             "docs/flags.md.", ""]
    for dataset, (head, detail, raised) in tables(records).items():
        recs = [r for r in records if r["dataset"] == dataset]
        provenance = next((r["data_provenance"] for r in recs if r.get("data_provenance")), "unknown")
        n = sorted({r["n"] for r in recs})
        revisions = sorted({str(r.get("git")) for r in recs})
        machines = Counter(f"{r.get('device', 'unknown')} (torch {r.get('torch')})" for r in recs)
        lines += [f"## {dataset}", "",
                  f"- data: {provenance}", f"- evaluated images: {', '.join(map(str, n))}",
                  f"- harness version {recs[0].get('version')}, git {', '.join(revisions)}",
                  "- computed on " + ", ".join(f"{m}: {k} cells" for m, k in sorted(machines.items())), ""]
        notes: list[str] = []
        marked = detail.copy()
        for i, row in marked.iterrows():
            marks: dict[str, str] = {}
            for flag in (f for f in raised if f.defense == row["defense"]):
                notes.append(f"{flag.defense} `{flag.code}`: {flag.evidence}")
                marks[flag.code] = marks.get(flag.code, flag.code) + f"[^{dataset}-{len(notes)}]"
            marked.at[i, "flags"] = ", ".join(marks.values())
        resolved = {r["defense"]: r["defense_resolved"] for r in recs
                    if r.get("defense_resolved") not in (None, r["defense"])}
        marked["defense"] = [f"{d} = {resolved[d]}" if d in resolved else d for d in marked["defense"]]
        headline = head.copy()
        headline["flags"] = marked["flags"]
        headline["defense"] = marked["defense"]
        lines += ["### Headline", "", headline.map(_fmt).to_markdown(index=False, disable_numparse=True), "",
                  "### All cells", "", marked.map(_fmt).to_markdown(index=False, disable_numparse=True), ""]
        lines += _components(last_records(recs))
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
    """All records flat, without the per-image masks and images; ensemble components as ``stage:accuracy``."""
    rows = []
    for r in last_records(records):
        row = {k: v for k, v in r.items() if k not in MASK_FIELDS}
        if "components" in row:
            row["components"] = " ".join(f"{c['attack']}:{c['robust_acc']}" for c in row["components"])
        for k, v in row.items():
            if isinstance(v, dict | list):
                row[k] = json.dumps(v, sort_keys=True)
        rows.append(row)
    return pd.DataFrame(rows)


def write(out: Path, records: list[dict[str, Any]] | None = None) -> Path:
    """(Re-)render ``out/leaderboard.md``, ``out/cells.csv`` and the figures in ``out/plots`` from
    ``out/cells.jsonl`` (or ``records``)."""
    out = Path(out)
    if records is None:
        records = read_records(out / "cells.jsonl")
    latest = last_records(records)
    check_compatible(latest, str(out / "cells.jsonl"))
    write_text(out / "leaderboard.md", render(records, planned(out)))
    write_text(out / "cells.csv", csv_frame(records).to_csv(index=False))
    plots.write(latest, out / "plots", worst_case)
    sheet.write(latest, out / "plots")
    return out / "leaderboard.md"


def planned(out: Path) -> set[str] | None:
    """The cell ids ``bench run`` planned for ``out`` (``OUT/plan.json``), or None when unknown or unreadable."""
    try:
        cells = json.loads((out / PLAN).read_text())["cells"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {c for c in cells if isinstance(c, str)} if isinstance(cells, list) else None
