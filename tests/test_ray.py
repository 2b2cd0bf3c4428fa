"""``--executor ray`` on real MNIST: the same cells as local, dead workers retried, failing cells and trainings as
error records, a killed driver resumed, and clear exits for a missing Ray or a wrong cluster.

One local Ray (2 CPUs) serves the in-process tests. Its workers run :func:`register_test_components` at start-up
(Ray's ``worker_process_setup_hook``), so the test attack and defense that raise exist there too, and see the
fault-injection hook ``BENCH_TEST_DIE_ONCE`` (see :func:`bench.ray_executor._die_once`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from threading import Event
from typing import Any

import pytest

from bench.attacks import REGISTRY as ATTACKS
from bench.attacks.base import Attack
from bench.cli import main
from bench.errors import BenchError
from bench.evaluate import Context
from bench.settings import Settings
from bench.executors import LocalExecutor
from bench.grid import expand
from bench.runner import run
from bench.suite import load_suite
from conftest import ROOT, bench, tiny_suite
from defenses import REGISTRY as DEFENSES
from defenses.base import Defense

pytestmark = pytest.mark.ray

TIMING = {"seconds", "attack_seconds"}
BLACKBOX = '[[attacks]]\nname = "fgsm"\neps = 0.3\nthreat = "blackbox"\n[blackbox]\nrounds = 2\nepochs = 2\n'


class _Raises(Attack):
    """Test attack that raises inside the attack."""

    name = "raises"
    gradient = False

    def perturb(self, model, x, y, eps, target):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


class _Untrainable(Defense):
    """Test defense whose training raises."""

    name = "untrainable"

    def training_batch(self, model, x, y, progress=1.0):  # type: ignore[no-untyped-def]
        raise RuntimeError("cannot train")


def register_test_components() -> None:
    ATTACKS.register(_Raises)
    DEFENSES.register(_Untrainable)


@pytest.fixture(scope="module")
def die_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The marker of the fault-injection hook BENCH_TEST_DIE_ONCE: while it exists, no worker dies."""
    marker = tmp_path_factory.mktemp("ray") / "died"
    marker.touch()
    return marker


@pytest.fixture(scope="module")
def cluster(data_dir: Path, cache_dir: Path, die_once: Path) -> Iterator[None]:
    """A 2-CPU local Ray for the module, which every RayExecutor of this process uses."""
    ray = pytest.importorskip("ray")
    ATTACKS._load()
    DEFENSES._load()
    register_test_components()
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "BENCH_TEST_DIE_ONCE": str(die_once)},
                          "worker_process_setup_hook": "test_ray.register_test_components"})
    yield
    ray.shutdown()
    ATTACKS._items.pop(_Raises.name)
    DEFENSES._items.pop(_Untrainable.name)


def cluster_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


def strip(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["cell_id"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def test_ray_and_local_give_the_same_cells_and_leaderboard(tmp_path: Path, cluster: None, data_dir: Path,
                                                            cache_dir: Path) -> None:
    from bench.ray_executor import RayExecutor

    suite = load_suite(tiny_suite(tmp_path / "s.toml", extra=BLACKBOX))
    settings = Settings(data_dir=str(data_dir), cache_dir=str(cache_dir))
    remote = run(suite, tmp_path / "ray", settings, executor=RayExecutor(), progress=False)
    local = run(suite, tmp_path / "local", settings, executor=LocalExecutor(), progress=False)
    assert remote.exit_code == local.exit_code == 0 and remote.computed == local.computed == 5
    ray_rows, local_rows = records(tmp_path / "ray"), records(tmp_path / "local")
    assert strip(ray_rows) == strip(local_rows)
    assert all(0.9 < r["clean_acc"] <= 1 for r in ray_rows)
    assert sum("same_as" in r for r in ray_rows) == 2 and any(r["threat"] == "blackbox" for r in ray_rows)
    assert (tmp_path / "ray" / "leaderboard.md").read_text() == (tmp_path / "local" / "leaderboard.md").read_text()


@pytest.mark.parametrize(("extra", "artifacts"), [
    ('[[defenses]]\nname = "squeeze"\n', 1),  # squeeze evaluates the undefended weights: one training
    (BLACKBOX, 2),  # the classifier (also the substitute's oracle) and the substitute
])
def test_each_trained_artifact_is_one_task(tmp_path: Path, cluster: None, data_dir: Path, extra: str,
                                           artifacts: int) -> None:
    import ray

    from bench.ray_executor import RayExecutor

    grid = [c for c in expand(load_suite(tiny_suite(tmp_path / "s.toml", extra=extra))) if c.key == c.compute_key]
    ctx = Context(Settings(data_dir=str(data_dir), cache_dir=str(tmp_path / "empty-cache")))
    refs, trainings, roots = RayExecutor()._submit(grid, ctx.settings, ctx)
    for ref in roots:  # the others fail with their dependency (cancelling them can abort Ray's driver)
        ray.cancel(ref, recursive=False)
    assert len(refs) == len(grid) and len(trainings) == artifacts
    assert roots == trainings[:1]  # with an empty cache, every task but the first training waits for another


def test_failing_cells_and_trainings_become_error_records(tmp_path: Path, cluster: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tiny_suite(tmp_path / "s.toml", eps="[0.1]", extra='[[defenses]]\nname = "untrainable"\n'
                      '[[attacks]]\nname = "raises"\neps = 0.1\nthreat = "whitebox"\n')
    path.write_text(path.read_text().replace('threat = ["whitebox", "bpda"]', 'threat = "bpda"'))
    code = main(["run", str(path), "--out", str(tmp_path / "out"), "--executor", "ray", "--no-progress"])
    stderr = capsys.readouterr().err
    assert code == 1
    rows = {(r["defense"], r["attack"]): r for r in records(tmp_path / "out")}
    assert len(rows) == 4 and rows["none", "fgsm"]["error"] is None and 0 < rows["none", "fgsm"]["clean_acc"]
    assert rows["none", "raises"]["error"] == "RuntimeError: boom"
    assert 'raise RuntimeError("boom")' in rows["none", "raises"]["traceback"]
    for attack in ("fgsm", "raises"):
        failed = rows["untrainable", attack]
        assert failed["error"].startswith("ArtifactFailed: training the model of untrainable failed")
        assert "cannot train" in failed["error"] and "cannot train" in failed["traceback"]
    assert "failed: mnist none raises wb eps=0.1: RuntimeError: boom" in stderr
    assert stderr.count("  failed: mnist untrainable") == 2


def test_a_task_asking_for_more_gpus_than_the_cluster_has_exits_2(tmp_path: Path, cluster: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(tiny_suite(tmp_path / "s.toml")), "--out", str(tmp_path / "out"), "--executor", "ray",
                 "--gpus-per-cell", "0.5", "--no-progress"])
    assert code == 2 and "--gpus-per-cell 0.5: no node of the Ray cluster has that many GPUs" in capsys.readouterr().err


def test_cuda_without_gpus_per_cell_is_refused_before_starting_ray(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from bench.ray_executor import RayExecutor

    cells = expand(load_suite(tiny_suite(tmp_path / "s.toml")))
    with pytest.raises(BenchError, match="--device cuda: Ray hides the GPUs .* add --gpus-per-cell"):
        next(RayExecutor().run(cells, Settings(device="cuda"), Event(), lambda cell: None))


def test_the_embedded_ray_has_this_machines_cores(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """Without --address, ``bench run`` starts a Ray of its own on the available cores (and stops it)."""
    result = bench("run", str(tiny_suite(tmp_path / "s.toml")), "--out", str(tmp_path / "out"), "--executor", "ray",
                   "--cpus-per-cell", "4096", env=bench_env)
    assert result.returncode == 2 and result.stderr.startswith("bench: error: --cpus-per-cell 4096")
    assert f"(largest: {len(os.sched_getaffinity(0))})" in result.stderr


def test_a_dead_worker_is_retried(tmp_path: Path, cluster: None, die_once: Path, data_dir: Path,
                                  cache_dir: Path) -> None:
    from bench.ray_executor import RayExecutor

    die_once.unlink()  # the next cell task creates the marker again and kills its worker process
    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    summary = run(suite, tmp_path / "out", Settings(data_dir=str(data_dir), cache_dir=str(cache_dir)),
                  executor=RayExecutor(), progress=False)
    assert die_once.exists() and summary.exit_code == 0 and summary.computed == 4
    rows = records(tmp_path / "out")
    assert len(rows) == len({r["cell_id"] for r in rows}) == 4 and all(r["error"] is None for r in rows)


def test_a_killed_driver_resumes_without_recomputing_or_losing_cells(tmp_path: Path, cluster: None,
                                                                     bench_env: dict[str, str]) -> None:
    """``bench run --executor ray --address ...`` killed mid-grid, then the same command again."""
    eps = "[" + ", ".join(f"{e / 100:g}" for e in range(2, 22, 2)) + "]"  # 10 white-box cells
    path = tiny_suite(tmp_path / "s.toml", n=500, eps=eps)
    path.write_text(path.read_text().replace('threat = ["whitebox", "bpda"]', 'threat = "whitebox"'))
    out = tmp_path / "out"
    command = ["run", str(path), "--out", str(out), "--executor", "ray", "--address", cluster_address()]
    process = subprocess.Popen([sys.executable, "-m", "bench.cli", *command], env=bench_env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "cells.jsonl").exists() or (out / "cells.jsonl").read_bytes().count(b"\n") < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = [line for line in (out / "cells.jsonl").read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 3 <= len(written) < 10
    resumed = bench(*command, env=bench_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(written)} resumed, {10 - len(written)} computed" in resumed.stdout
    final = (out / "cells.jsonl").read_text().splitlines(keepends=True)
    assert final[:len(written)] == written
    assert len(final) == len({r["cell_id"] for r in records(out)}) == 10


def test_an_address_where_nothing_answers_fails_fast() -> None:
    pytest.importorskip("ray")
    from bench.ray_executor import RayExecutor

    with pytest.raises(BenchError, match="127.0.0.1:1: nothing answers there"):
        RayExecutor(address="127.0.0.1:1")._probe()


def test_without_ray_the_ray_executor_exits_2_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    code = main(["run", str(tiny_suite(tmp_path / "s.toml")), "--out", str(tmp_path / "out"), "--executor", "ray"])
    assert code == 2 and 'pip install -e ".[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
