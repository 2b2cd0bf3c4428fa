"""``--executor ray``: the grid as Ray tasks, on an embedded local Ray or on a cluster (``--address``).

Design: one task per distinct trained artifact and one task per cell. An artifact is a defended classifier
(grouped by its model-cache key, so ``squeeze`` cells share the ``none`` training) or a black-box substitute
(which depends on its oracle's classifier task). Artifact tasks train into the model cache, a path every node
sees, and return only the cache key; a cell task gets the ObjectRefs of the artifacts it needs as arguments, so
Ray starts it after they exist, and loads them from the cache. Weights never pass through the object store: the
cache already holds them, outlives a killed driver (a resumed run gets no task for an artifact already cached)
and serves later local runs. The task graph trains each artifact once; the cache's file lock per key is the
second line of defence.

A task is pure (cell spec + Settings → record), with a per-worker :class:`Context` memo and seeds from the
cell. The driver yields records as they finish; the runner is the only writer. A dead worker is retried by Ray
(``max_retries``); an exception in a cell, or in the training it needs, becomes an error record with a
``traceback`` field; a user error (BenchError, e.g. missing data on a node) stops the run as it does locally;
Ctrl-C cancels the tasks that have no ObjectRef arguments; the others then fail with their dependency. Ray 2.60's
driver aborts when a task is cancelled while its ObjectRef arguments resolve (``submitted_task_ref_count > 0``,
ray-project/ray#56123), which killed a CI run. Cluster set-up: docs/cluster.md.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from threading import Event
from typing import Any

from bench.data import resolve_dir
from bench.errors import BenchError, Interrupted
from bench.evaluate import Context, error_record
from bench.settings import Settings, available_cores
from bench.threats import REGISTRY as THREATS
from bench.executors import evaluate_or_record_error
from bench.grid import Cell
from bench.train import cache_key

INSTALL = 'pip install -e ".[ray]"'
PROBE_SECONDS = 10
RETRIES = 3  # runs of a task whose worker process died (OOM kill, lost node) before its cell is an error record
DIE_ONCE = "BENCH_TEST_DIE_ONCE"  # fault injection for tests only, see _die_once
_CONTEXTS: dict[Settings, Context] = {}
# Announces at every start that token authentication (Ray's default) is on; the driver's console stays clean.
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class ArtifactFailed(Exception):
    """Training a model that a cell needs raised, so the cell cannot be evaluated."""


def _context(settings: Settings, cpus: float) -> Context:
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"{settings.device}: torch on {socket.gethostname()} cannot use CUDA (a CPU-only build?)")
    if settings not in _CONTEXTS:
        _CONTEXTS[settings] = Context(settings)
    return _CONTEXTS[settings]


def _die_once() -> None:
    """Fault injection for tests: with ``$BENCH_TEST_DIE_ONCE=PATH``, the first cell task creates PATH and kills
    its worker process, as a crashed node would; every later task (and the retry) finds PATH and goes on."""
    marker = os.environ.get(DIE_ONCE)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os._exit(1)


def _artifact(kind: str, cell: Cell, settings: Settings, cpus: float, *after: str) -> str:
    """Train (or load) the cell's classifier (``kind="model"``) or substitute into the cache; its cache key."""
    ctx = _context(settings, cpus)
    try:
        ctx.models.load(kind, cell)
        return cache_key(ctx.models.artifact(kind, cell)[1])
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - becomes an error record of every cell that needs this model
        raise ArtifactFailed(f"training the {kind} of {cell.defense_id} failed: {type(exc).__name__}: {exc}") from exc


def _cell(cell: Cell, settings: Settings, cpus: float, *after: str) -> dict[str, Any]:
    _die_once()
    return evaluate_or_record_error(cell, _context(settings, cpus), keep_traceback=True)


class RayExecutor:
    """Cells and trainings as Ray tasks; ``address=None`` starts an embedded Ray on this machine's cores."""

    def __init__(self, address: str | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0) -> None:
        try:
            import ray
        except ImportError:
            raise BenchError(f"--executor ray needs Ray, which is not installed: {INSTALL} "
                             f"(or pip install 'qusec-bench[ray]')") from None
        self.ray, self.address, self.cpus, self.gpus = ray, address, cpus_per_cell, gpus_per_cell

    def run(self, cells: list[Cell], settings: Settings, stop: Event,
            on_start: Callable[[Cell], None]) -> Iterator[dict[str, Any]]:
        if not cells:  # a finished grid resumed: no reason to start Ray
            return
        if settings.device.startswith("cuda") and not self.gpus:
            raise BenchError(f"--device {settings.device}: Ray hides the GPUs from tasks that do not ask for one; "
                             f"add --gpus-per-cell (e.g. 0.25) or use --device cpu")
        ray = self.ray
        started = self._connect()
        outstanding: dict[Any, Cell] = {}
        roots: list[Any] = []
        try:
            self._check_resources()
            outstanding, _, roots = self._submit(cells, settings, Context(settings, stop=stop))
            while outstanding:
                on_start(next(iter(outstanding.values())))
                ready: list[Any] = []
                while not ready:
                    if stop.is_set():
                        raise Interrupted
                    ready, _ = ray.wait(list(outstanding), num_returns=1, timeout=0.5)
                yield self._collect(ready[0], outstanding.pop(ready[0]))
        finally:
            for ref in roots if outstanding else []:
                ray.cancel(ref, recursive=False)
            if started:
                ray.shutdown()

    def _connect(self) -> bool:
        """Start or join Ray unless this process already did; True when it must be shut down afterwards."""
        ray = self.ray
        if ray.is_initialized():
            return False
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        logging.getLogger(AUTH_LOGGER).setLevel(logging.ERROR)
        if self.address is None:
            ray.init(address="local", num_cpus=available_cores(), include_dashboard=False, **quiet)
            return True
        self._probe()
        try:
            ray.init(address=self.address, **quiet)
        except ConnectionError as exc:
            raise BenchError(f"--address {self.address}: cannot join a Ray cluster there ({exc}); is its head running "
                             f"(`ray start --head`) and, if it uses token authentication, are RAY_AUTH_MODE=token "
                             f"and its token set here? (docs/cluster.md)") from None
        return True

    def _probe(self) -> None:
        """Ray retries an explicit ``host:port`` that nothing answers on for many minutes: fail in seconds."""
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if self.address == "auto" or not port.isdigit():
            return
        try:
            socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
        except OSError as exc:
            raise BenchError(f"--address {self.address}: nothing answers there ({exc}); is the Ray head running "
                             f"(`ray start --head`, see docs/cluster.md)?") from None

    def _check_resources(self) -> None:
        """A task asking more than any node has would wait forever: refuse it now."""
        nodes = [n["Resources"] for n in self.ray.nodes() if n["Alive"]]
        for flag, name, wanted in (("--cpus-per-cell", "CPU", self.cpus), ("--gpus-per-cell", "GPU", self.gpus)):
            largest = max((r.get(name, 0.0) for r in nodes), default=0.0)
            if wanted > largest:
                raise BenchError(f"{flag} {wanted:g}: no node of the Ray cluster has that many {name}s "
                                 f"(largest: {largest:g})")

    def _submit(self, cells: list[Cell], settings: Settings,
                ctx: Context) -> tuple[dict[Any, Cell], list[Any], list[Any]]:
        """One task per artifact not yet in the cache, then one per cell depending on its artifacts' tasks.

        Returns the cell tasks, the artifact tasks, and the tasks of both kinds without ObjectRef arguments (the
        only ones safe to cancel, see the module docstring)."""
        remote = self.ray.remote
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": RETRIES}
        artifact, cell_task = remote(_artifact).options(**options), remote(_cell).options(**options)
        worker = replace(settings, data_dir=str(resolve_dir(settings.data_dir)),
                         cache_dir=str(ctx.models.cache.root.resolve()),
                         device="cuda" if self.gpus > 0 else settings.device)
        tasks: dict[str, Any] = {}
        roots: list[Any] = []

        def needs(kind: str, cell: Cell, after: list[Any]) -> list[Any]:
            label, fields = ctx.models.artifact(kind, cell)
            key = repr(fields)
            if key not in tasks:
                cached = ctx.models.cache.exists(cell.dataset.value, label, fields)
                tasks[key] = None if cached else artifact.remote(kind, cell, worker, self.cpus, *after)
                roots.extend([] if cached or after else [tasks[key]])
            return [tasks[key]] if tasks[key] is not None else []

        refs: dict[Any, Cell] = {}
        for cell in cells:
            deps = needs("model", cell, [])
            for kind, needed in THREATS.get(cell.threat)().requires(cell, ctx):
                deps += needs(kind, needed, list(deps))
            ref = cell_task.remote(cell, worker, self.cpus, *deps)
            refs[ref] = cell
            roots += [] if deps else [ref]
        return refs, [ref for ref in tasks.values() if ref is not None], roots

    def _collect(self, ref: Any, cell: Cell) -> dict[str, Any]:
        """The cell's record; a task that raised (its training included) or kept dying is an error record."""
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, Exception) else exc
            if isinstance(cause, BenchError):
                raise cause from None
            return {**error_record(cell, cause, 0.0), "traceback": str(exc)}
        except exceptions.RayError as exc:
            return {**error_record(cell, exc, 0.0), "traceback": str(exc)}
