"""Executors hand cells to workers and yield their records as they finish; the runner is the only writer.

``local`` evaluates the cells in this process, in grid order, so trained models and clean predictions are
reused from the per-process memo. Other executors (Ray, see :mod:`bench.ray_executor`) follow the same protocol.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from threading import Event
from typing import Any, Protocol

from bench.errors import BenchError, Interrupted
from bench.evaluate import Context, error_record, run_cell
from bench.grid import Cell
from bench.settings import Settings


class Executor(Protocol):
    def run(self, cells: list[Cell], settings: Settings, stop: Event,
            on_start: Callable[[Cell], None]) -> Iterator[dict[str, Any]]:
        """Evaluate ``cells``, yielding one record per cell as soon as it is done."""
        ...


def evaluate_or_record_error(cell: Cell, ctx: Context, *, keep_traceback: bool = False) -> dict[str, Any]:
    """``run_cell``, except that an attack or defense failure becomes an error record instead of an exception
    (with a ``traceback`` field when ``keep_traceback``: remote workers have no console to print it on).

    User errors (:class:`BenchError`, e.g. missing data) and Ctrl-C still propagate: they stop the run.
    """
    start = time.perf_counter()
    try:
        return run_cell(cell, ctx)
    except (BenchError, Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a failing cell must not kill the grid; the record keeps the message
        record = error_record(cell, exc, time.perf_counter() - start)
        return {**record, "traceback": traceback.format_exc()} if keep_traceback else record


class LocalExecutor:
    """Cells one after another in this process."""

    def __init__(self, context: Context | None = None) -> None:
        self.context = context

    def run(self, cells: list[Cell], settings: Settings, stop: Event,
            on_start: Callable[[Cell], None]) -> Iterator[dict[str, Any]]:
        ctx = self.context or Context(settings, stop=stop)
        for cell in cells:
            ctx.check_stop()
            on_start(cell)
            yield evaluate_or_record_error(cell, ctx)
