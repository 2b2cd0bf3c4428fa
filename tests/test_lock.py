"""The one-writer lock on a results directory: processes racing for it, exactly one wins, every time."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from bench.errors import BenchError
from bench.results import ResultsStore
from conftest import ROOT

TRIALS = 8
FORK = multiprocessing.get_context("fork")


def _contend(out: str, start: Barrier, tried: Synchronized, results: multiprocessing.SimpleQueue) -> None:
    """Take the lock right after every contender passed the barrier; a holder keeps it until all have tried."""
    start.wait()
    try:
        with ResultsStore(out):
            with tried.get_lock():
                tried.value += 1
            while tried.value < start.parties:
                time.sleep(0.001)
            results.put("held")
    except BenchError:
        with tried.get_lock():
            tried.value += 1
        results.put("refused")


def _race(out: Path, contenders: int) -> list[str]:
    start, tried, results = FORK.Barrier(contenders), FORK.Value("i", 0), FORK.SimpleQueue()
    processes = [FORK.Process(target=_contend, args=(str(out), start, tried, results)) for _ in range(contenders)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    return sorted(results.get() for _ in range(contenders))


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.mark.parametrize("contenders", [3, 8])
@pytest.mark.parametrize("left_over", ["none", "empty", "dead owner"])
def test_exactly_one_of_n_racing_processes_holds_the_lock(tmp_path: Path, contenders: int, left_over: str) -> None:
    """Also when a lock file is already there: empty (what a racing writer's file looks like before its pid is
    written) or left by a dead run."""
    dead = _dead_pid()
    for trial in range(TRIALS):
        out = tmp_path / str(trial)
        out.mkdir()
        if left_over != "none":
            (out / ".lock").write_text("" if left_over == "empty" else f"{dead}@{os.uname().nodename}")
        assert _race(out, contenders) == ["held"] + ["refused"] * (contenders - 1), f"trial {trial}"
        assert not (out / ".lock").exists()


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bench.results import ResultsStore\n"
                               f"with ResultsStore({str(tmp_path)!r}):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(BenchError, match="in use by another bench run"), ResultsStore(tmp_path):
        pass
    holder.kill()
    holder.wait()
    with ResultsStore(tmp_path):
        assert (tmp_path / ".lock").read_text().startswith(f"{os.getpid()}@")
