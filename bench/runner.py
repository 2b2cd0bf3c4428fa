"""``bench run``: suite → grid → pending cells → executor → results store → leaderboard.

Resume is the default: cells already in ``OUT/cells.jsonl`` (by key) are not recomputed; error records are
retried. Records of cells that are no longer in the grid (the suite changed), records computed on other weights
than the model now in the cache (retrained differently) and, with ``--fresh``, all old records are moved to
``OUT/cells.stale.jsonl``: nothing is deleted. Records of a model missing from the cache are checked once the run
has trained it, and computed again in the same run. Ctrl-C stops after the current batch. ``bench run --train-only``
(:func:`train_only`) trains the models the cells need and runs none of them.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from threading import Event
from typing import Any

from tqdm.auto import tqdm

from bench import leaderboard
from bench.errors import BenchError, Interrupted
from bench.evaluate import Context, error_record, record_base
from bench.executors import Executor, LocalExecutor
from bench.grid import Cell, expand, select
from bench.plots import dataset_title
from bench.progress import bar as progress_bar
from bench.provider import weights_digest
from bench.results import ResultsStore, write_text
from bench.settings import Settings
from bench.suite import Suite
from bench.threats import REGISTRY as THREATS
from defenses import REGISTRY as DEFENSES
from defenses.base import Defense

PROBE_IMAGES = 8  # evaluated images a custom preprocessing module is checked on before any cell runs


@dataclass
class RunSummary:
    total: int
    resumed: int
    computed: int = 0
    errors: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.errors else 0)

    def describe(self) -> str:
        done = self.resumed + self.computed
        text = (f"{done}/{self.total} cells done ({self.resumed} resumed, {self.computed} computed, "
                f"{len(self.errors)} failed) in {self.seconds:.1f} s")
        if self.interrupted:
            text += "; interrupted: run the same command again to resume"
        return text


def default_out(suite: Suite, limit: int | None) -> Path:
    """``results/<suite>``; a ``--limit`` run goes to ``results/<suite>-limit<N>`` so it never mixes with a full run."""
    return Path("results") / (suite.name if not limit else f"{suite.name}-limit{limit}")


def plan(suite: Suite, limit: int | None = None) -> list[Cell]:
    cells = expand(suite)
    if limit:
        cells = [replace(c, n=min(c.n, limit)) for c in cells]
    return cells


def check_data(cells: list[Cell], ctx: Context) -> None:
    """Load every dataset the cells use and pick their images, so that missing, unreadable or malformed data, an
    n larger than the test set or too few images for the black-box holdout stop the run (exit 2) before any
    cell runs, instead of failing every cell (after training); and probe every preprocessing module the harness
    did not write on a few evaluated images (output shape and range)."""
    for cell in {(c.dataset, c.n, c.sample, c.seed, c.threat, repr(c.threat_params)): c for c in cells}.values():
        test = ctx.models.data(cell.dataset).test
        if cell.n > len(test):
            raise BenchError(f"datasets.{cell.dataset.value}.n = {cell.n}: the {cell.dataset.value} test set has "
                             f"only {len(test)} images")
        ctx.models.eval_set(cell)
        THREATS.get(cell.threat)().check(cell, ctx)
    for cell in {(c.dataset, c.defense, repr(c.defense_values)): c for c in cells
                 if DEFENSES.get(c.defense).untrusted}.values():
        ctx.models.defense(cell).check_output(ctx.models.eval_set(cell)[1][:PROBE_IMAGES])


@contextmanager
def _ctrl_c_stops(stop: Event) -> Iterator[None]:
    """First Ctrl-C: finish the current batch, then stop. Second Ctrl-C: stop now."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        tqdm.write("stopping after the current batch (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(suite: Suite, out: Path, settings: Settings, *, limit: int | None = None, fresh: bool = False,
        executor: Executor | None = None, progress: bool = True, only: list[str] | None = None) -> RunSummary:
    """Run every pending cell of ``suite`` into ``out`` and render the leaderboard; see module docstring.

    ``only`` (``--only``) restricts the run to the cells :func:`bench.grid.select` picks; the plan, the
    leaderboard and the records of the other cells stay the whole suite's, so slices run one after another fill
    the same grid."""
    start = time.perf_counter()
    settings = replace(settings, plugins=suite.plugins, reuse_crafted=settings.reuse_crafted and not fresh)
    plan_cells = plan(suite, limit)
    cells = select(plan_cells, only) if only else plan_cells
    stop = Event()
    driver = Context(settings, stop=stop)
    check_data(cells, driver)
    wanted = {c.key for c in plan_cells}
    chosen_keys = {c.key for c in cells}
    again_said = "computed again" if only is None else "computed again where --only selects them"
    with ResultsStore(out) as store:
        write_text(out / leaderboard.PLAN, json.dumps({"suite": suite.name, "cells": sorted(wanted)}, indent=0) + "\n")
        records = store.records()
        done = {r["cell_id"]: r for r in _valid(records, wanted - chosen_keys if fresh else wanted)}
        by_key = {c.key: c for c in plan_cells}
        stale = [r for r in records if done.get(r["cell_id"]) is not r]
        if stale:
            store.rewrite(list(done.values()), stale)
            outdated = sum(r["cell_id"] not in wanted for r in stale)
            if outdated:
                warnings.warn(f"{outdated} records in {store.path} are not part of this suite's grid (settings "
                              f"changed?); moved to cells.stale.jsonl", stacklevel=2)
        for r in _drop_retrained(store, by_key, driver, again_said):  # the store holds exactly ``done`` now
            del done[r["cell_id"]]
        pending = [c for c in cells if c.key not in done]
        if fresh:
            _forget_models(pending, driver)
        summary = RunSummary(total=len(cells), resumed=len(cells) - len(pending))
        bar = progress_bar(total=len(cells), initial=summary.resumed, desc=suite.name, unit="cell",
                           disable=not progress)

        def finish(record: dict[str, Any]) -> None:
            store.append(record)
            summary.computed += 1
            bar.update()
            if record.get("error"):
                summary.errors.append(f"{record['dataset']} {record['defense']} {record['attack']} "
                                      f"{record['threat_label']} eps={record['eps']}: {record['error']}")
                tqdm.write(f"cell failed: {summary.errors[-1]}", file=sys.stderr)

        chosen = executor or LocalExecutor(driver)

        def started(cell: Cell) -> None:
            bar.set_postfix_str(cell.describe())

        try:
            with _ctrl_c_stops(stop):
                _compute(pending, list(done.values()), chosen, settings, stop, finish, started)
                again = {r["cell_id"] for r in _drop_retrained(store, by_key, driver, again_said)}
                pending = [c for c in cells if c.key in again]  # their models were not cached before this run
                if pending:
                    summary.resumed -= len(pending)
                    bar.n -= len(pending)
                    _compute(pending, _valid(store.records(), wanted), chosen, settings, stop, finish, started)
        except (Interrupted, KeyboardInterrupt):
            summary.interrupted = True
            _drop_retrained(store, by_key, driver, "run again to compute them")
        finally:
            bar.close()
        all_records = store.records()
    leaderboard.write(out, all_records)
    if not summary.interrupted:
        _defense_plots(cells, driver, out / "plots")
    summary.seconds = time.perf_counter() - start
    return summary


def _valid(records: list[dict[str, Any]], cells: set[str]) -> list[dict[str, Any]]:
    """The first error-free record of each cell in ``cells``."""
    first: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["cell_id"] in cells and r.get("error") is None:
            first.setdefault(r["cell_id"], r)
    return list(first.values())


def _compute(pending: list[Cell], done: list[dict[str, Any]], executor: Executor, settings: Settings, stop: Event,
             finish: Callable[[dict[str, Any]], None], started: Callable[[Cell], None]) -> None:
    """Compute ``pending`` and ``finish`` each record: a cell whose computation a record in ``done`` or an earlier
    cell of ``pending`` already did (same ``compute_key``) gets a copy of that record instead."""
    by_compute = {r["compute_id"]: r for r in done}
    twins: dict[str, list[Cell]] = {}
    for cell in pending:
        twins.setdefault(cell.compute_key, []).append(cell)
    for key, source in by_compute.items():
        for twin in twins.get(key, []):
            finish(same_as(source, twin))
    to_compute = [group[0] for key, group in twins.items() if key not in by_compute]
    for record in executor.run(to_compute, settings, stop, started):
        for twin in twins[record["compute_id"]]:
            finish(record if twin.key == record["cell_id"] else same_as(record, twin))


def _drop_retrained(store: ResultsStore, cells: dict[str, Cell], ctx: Context, then: str) -> list[dict[str, Any]]:
    """Move the records of ``cells`` computed on other weights than the cached models to cells.stale.jsonl (said
    in a warning ending ``then``) and return them: a run that trained a model its stored records predate finds
    them only after training it."""
    records = store.records()
    retrained = _on_other_weights([r for r in records if r["cell_id"] in cells and r.get("error") is None], cells,
                                  ctx)
    if retrained:
        moved = {id(r) for r in retrained}
        store.rewrite([r for r in records if id(r) not in moved], retrained)
        _warn_retrained(retrained, store.path, then)
    return retrained


def _on_other_weights(records: list[dict[str, Any]], cells: dict[str, Cell], ctx: Context) -> list[dict[str, Any]]:
    """The records whose cell's defended model, as the cache holds it now, has other weights than the record was
    computed on (a model lost from the cache and retrained on another device, say): the per-image worst case may
    only combine cells of one model. Records of a model not in the cache cannot be compared and stay (they are
    compared once a run has trained it). Records of an older harness carry no ``weights`` digest: for them the
    model's test accuracy (``model_test_acc``, 4 digits on the full test set) stands in; it told apart all ten
    pairs of MNIST models trained here on 1 and on 2 threads."""
    facts: dict[str, dict[str, Any] | None] = {}
    other = []
    for r in records:
        cell = cells[r["cell_id"]]
        if cell.model is not None:
            continue
        model = repr(ctx.models.artifact("model", cell))
        if model not in facts:
            facts[model] = ctx.models.cached_facts(cell)
        now = facts[model]
        if now is None:
            continue
        if r.get("weights") is not None:
            differs = r["weights"] != weights_digest(now)
        else:
            differs = r.get("model_test_acc") is not None and r["model_test_acc"] != now.get("test_acc")
        if differs:
            other.append(r)
    return other


def _warn_retrained(records: list[dict[str, Any]], path: Path, then: str) -> None:
    if records:
        names = sorted({f"{r['dataset']} {r['defense']}" for r in records})
        warnings.warn(f"{len(records)} records in {path} were computed on other weights than the cached model of "
                      f"{', '.join(names)} (retrained differently since): moved to cells.stale.jsonl; {then}",
                      stacklevel=3)


def same_as(source: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """The record of ``cell`` when it is the same computation as ``source`` (e.g. bpda of a defense with nothing
    to approximate is its whitebox cell): the numbers are copied, the identity is the cell's own."""
    if source.get("error"):
        return {**error_record(cell, Exception(source["error"]), 0.0), "error": source["error"]}
    identity = record_base(cell)
    return {**source, **{k: identity[k] for k in ("threat", "threat_params", "threat_label", "cell_id", "purpose")},
            "same_as": source["cell_id"], "seconds": 0.0}


def artifacts(cells: list[Cell], ctx: Context) -> list[tuple[str, Cell]]:
    """The trained artifacts ``cells`` need, each once, in dependency order: ``("model", cell)`` for a classifier
    (defended, undefended or a black-box oracle), ``("substitute", cell)`` for a black-box substitute."""
    seen: set[str] = set()
    needed: list[tuple[str, Cell]] = []
    for cell in cells:
        for kind, artifact_cell in [("model", cell), *THREATS.get(cell.threat)().requires(cell, ctx)]:
            key = repr(ctx.models.artifact(kind, artifact_cell)[1])
            if key not in seen:
                seen.add(key)
                needed.append((kind, artifact_cell))
    return needed


def _forget_models(cells: list[Cell], ctx: Context) -> None:
    """``--fresh``: drop the cached models (and substitutes) these cells use, so they are trained again."""
    for kind, cell in artifacts(cells, ctx):
        label, fields = ctx.models.artifact(kind, cell)
        ctx.models.cache.remove(cell.dataset.value, label, fields)


def train_only(suite: Suite, settings: Settings, *, limit: int | None = None, only: list[str] | None = None,
               fresh: bool = False, report: Callable[[str], None] = print) -> int:
    """``bench run --train-only``: train into the cache every model and substitute the selected cells need (with
    ``fresh``, again), one after another in dependency order, and run no cell; ``report`` gets one line per
    artifact. Returns how many were trained. A later ``bench run`` of the same cells, here or on a machine
    sharing the cache, then only attacks. Ctrl-C stops within a training batch (Interrupted); what finished stays
    cached."""
    cells = plan(suite, limit)
    cells = select(cells, only) if only else cells
    stop = Event()
    ctx = Context(settings, stop=stop)
    check_data(cells, ctx)
    needed = artifacts(cells, ctx)
    if fresh:
        _forget_models(cells, ctx)
    trained = 0
    with _ctrl_c_stops(stop):
        for number, (kind, cell) in enumerate(needed, 1):
            label, fields = ctx.models.artifact(kind, cell)
            name = f"[{number}/{len(needed)}] {cell.dataset.value}"
            if kind == "model" and cell.model is not None:
                report(f"{name} {cell.defense_id}: the suite's own classifier ({cell.model['ref']}), never trained here")
                continue
            name += f" {label}"
            if ctx.models.cache.exists(cell.dataset.value, label, fields):
                report(f"{name}: cached")
                continue
            start = time.perf_counter()
            ctx.models.load(kind, cell)
            trained += 1
            report(f"{name}: trained in {time.perf_counter() - start:.1f} s on {settings.device}")
    return trained


def _defense_plots(cells: list[Cell], ctx: Context, plots: Path) -> None:
    """Figures of trained defenses (e.g. learned TQ thresholds), for defenses that draw any and whose model is in
    the cache: drawing never trains a model."""
    seen = set()
    for cell in cells:
        defense = ctx.models.defense(cell)
        if type(defense).plots is Defense.plots or (cell.dataset, defense.id) in seen:
            continue
        seen.add((cell.dataset, defense.id))
        if not ctx.models.cache.exists(cell.dataset.value, *ctx.models.artifact("model", cell)):
            continue
        plots.mkdir(parents=True, exist_ok=True)
        try:
            title = dataset_title(cell.dataset.value, ctx.models.data(cell.dataset).official)
            defense.plots(ctx.models.model(cell), plots, title)
        except Exception as exc:  # noqa: BLE001 - a defense that failed to train already has error cells
            warnings.warn(f"no figures for {cell.dataset.value} {defense.id}: {type(exc).__name__}: {exc}",
                          stacklevel=2)
