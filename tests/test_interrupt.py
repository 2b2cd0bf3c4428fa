"""Killed and interrupted runs lose nothing: SIGKILL at several moments, then resume, equals one clean run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, bench, tiny_suite

TIMING = {"seconds", "attack_seconds"}
EPS = "[" + ", ".join(f"{e / 100:g}" for e in range(2, 32, 2)) + "]"  # 15 white-box cells


def suite(tmp_path: Path) -> Path:
    path = tiny_suite(tmp_path / "s.toml", n=1000, eps=EPS)
    path.write_text(path.read_text().replace('threat = ["whitebox", "bpda"]', 'threat = "whitebox"'))
    return path


def cells(out: Path) -> list[dict]:
    path = out / "cells.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def count_lines(out: Path) -> int:
    path = out / "cells.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def start(path: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(path), "--out", str(out)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_lines(process: subprocess.Popen[str], out: Path, lines: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(out) < lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def strip(records: list[dict]) -> dict[str, dict]:
    return {r["cell_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in records}


def test_sigkill_at_five_moments_then_resume_equals_an_uninterrupted_run(tmp_path: Path, bench_env) -> None:  # type: ignore[no-untyped-def]
    path = suite(tmp_path)
    reference = bench("run", str(path), "--out", str(tmp_path / "ref"), env=bench_env)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    for lines in (0, 2, 5, 8, 11):
        process = start(path, out, bench_env)
        wait_for_lines(process, out, lines)
        if lines == 0:
            time.sleep(1.0)  # during start-up / data loading
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = bench("run", str(path), "--out", str(out), env=bench_env)
    assert finished.returncode == 0, finished.stderr
    records = cells(out)
    assert len(records) == len({r["cell_id"] for r in records}) == 15
    assert strip(records) == strip(cells(tmp_path / "ref"))
    assert (out / "leaderboard.md").read_text() == (tmp_path / "ref" / "leaderboard.md").read_text()


def test_ctrl_c_stops_after_the_current_batch_and_exits_130(tmp_path: Path, bench_env) -> None:  # type: ignore[no-untyped-def]
    path = suite(tmp_path)
    out = tmp_path / "out"
    process = start(path, out, bench_env)
    wait_for_lines(process, out, 3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "cells done" in stdout and "interrupted" in stdout and "Traceback" not in stderr
    done = count_lines(out)
    assert 3 <= done < 15
    resumed = bench("run", str(path), "--out", str(out), env=bench_env)
    assert resumed.returncode == 0 and f"{done} resumed" in resumed.stdout
    assert len(cells(out)) == 15


def test_ctrl_c_during_training_keeps_its_progress_and_the_next_run_resumes_it(tmp_path: Path, bench_env) -> None:  # type: ignore[no-untyped-def]
    """A training stopped part-way is not started over: the next run goes on from the saved state, to the weights
    of a training that was never stopped."""
    path = tiny_suite(tmp_path / "s.toml", n=10)
    path.write_text(path.read_text().replace("epochs = 2", "epochs = 5"))
    caches = {name: tmp_path / name for name in ("ref", "stopped")}
    reference = bench("run", str(path), "--train-only", env={**bench_env, "BENCH_CACHE_DIR": str(caches["ref"])})
    assert reference.returncode == 0, reference.stderr
    env = {**bench_env, "BENCH_CACHE_DIR": str(caches["stopped"])}
    log = tmp_path / "stderr"
    with log.open("w") as stderr:  # with bars: the training's bar says when its first batch starts
        process = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(path), "--train-only"],
                                   env={k: v for k, v in env.items() if k != "BENCH_NO_PROGRESS"}, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.monotonic() + 120
        while "train mnist none" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.5)  # inside the ~10 s of training (2 cores)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    assert process.returncode == 130, log.read_text()
    assert len(list(caches["stopped"].glob("mnist/*.partial.pt"))) == 1
    planned = bench("run", str(path), "--dry-run", env=env)
    assert planned.returncode == 0, planned.stderr
    assert re.search(r"mnist none \(resumes [1-9]\d* % done\): ~", planned.stdout), planned.stdout
    resumed = bench("run", str(path), "--train-only", env=env)
    assert resumed.returncode == 0 and "resuming at batch" in resumed.stderr, resumed.stderr
    assert not list(caches["stopped"].glob("mnist/*.partial.pt"))

    def digest(cache: Path) -> str:
        (sidecar,) = cache.glob("mnist/*.json")
        return json.loads(sidecar.read_text())["weights_sha256"]
    assert digest(caches["stopped"]) == digest(caches["ref"])
