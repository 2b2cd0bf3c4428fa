"""What a worker needs to evaluate cells, as plain data (executors ship it to other processes), and the machine
facts that size the work."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """``save_steps`` (default on): spend no attack step on an image whose answer is known (see
    :mod:`bench.craft`); off only to measure what the savings save (``benchmarks/step_savings.py``).
    ``reuse_crafted`` (default on): take transfer craftings stored by an earlier run (:mod:`bench.crafted`);
    off for ``--fresh`` and for measurements, which must pay for every crafting."""

    data_dir: str | None = None
    cache_dir: str | None = None
    device: str = "cpu"
    strict_data: bool = False
    batch: int | None = None  # images per attack call; None: bench.craft.attack_batch's choice
    save_steps: bool = True
    reuse_crafted: bool = True
    plugins: tuple[str, ...] = ()  # plug-in modules a worker imports before its cells (see bench.plugins)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
