"""The runner on real MNIST: resume, shared cells, failing cells, determinism, black-box isolation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import leaderboard
from bench.attacks import REGISTRY as ATTACKS
from bench.attacks.base import Attack
from bench.evaluate import Context, run_cell
from bench.executors import LocalExecutor
from bench.grid import expand
from bench.settings import Settings
from bench.runner import run
from bench.suite import load_suite
from conftest import tiny_suite

TIMING = {"seconds", "attack_seconds"}


def settings(data_dir: Path, cache_dir: Path) -> Settings:
    return Settings(data_dir=str(data_dir), cache_dir=str(cache_dir))


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


def test_run_writes_outputs_and_resumes_without_recomputing(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    first = run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    assert first.exit_code == 0 and first.computed == 4
    for name in ("cells.jsonl", "cells.csv", "leaderboard.md"):
        assert (tmp_path / "out" / name).is_file()
    records = lines(tmp_path / "out")
    assert len(records) == 4 and all(0.9 < r["clean_acc"] <= 1 for r in records)
    second = run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    assert second.computed == 0 and second.resumed == 4
    assert lines(tmp_path / "out") == records


def test_bpda_of_an_undefended_model_is_the_whitebox_cell(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    records = lines(tmp_path / "out")
    for eps in (0.1, 0.3):
        white = next(r for r in records if r["threat"] == "whitebox" and r["eps"] == eps)
        bpda = next(r for r in records if r["threat"] == "bpda" and r["eps"] == eps)
        assert bpda["same_as"] == white["cell_id"]
        assert {k: v for k, v in bpda.items() if k not in ("threat", "threat_params", "threat_label", "cell_id",
                                                             "same_as", *TIMING)} == \
               {k: v for k, v in white.items() if k not in ("threat", "threat_params", "threat_label", "cell_id",
                                                              *TIMING)}


def test_fgsm_breaks_the_undefended_model(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    by_eps = {r["eps"]: r for r in lines(tmp_path / "out") if r["threat"] == "whitebox"}
    assert by_eps[0.3]["robust_acc"] < 0.2 < by_eps[0.3]["success_rate"]
    assert by_eps[0.3]["robust_acc"] <= by_eps[0.1]["robust_acc"]
    assert by_eps[0.3]["linf"] == pytest.approx(0.3, abs=1e-6)
    clean_correct = round(by_eps[0.3]["clean_acc"] * 200)
    assert 0 < by_eps[0.3]["l0"] <= 1 and by_eps[0.3]["gradients"] == clean_correct < 200  # only those are attacked


def test_identical_runs_give_identical_cells(tmp_path: Path, data_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml", n=100))
    outs = []
    for i in range(2):
        run(suite, tmp_path / f"out{i}", settings(data_dir, tmp_path / f"cache{i}"), progress=False)
        outs.append([{k: v for k, v in r.items() if k not in TIMING} for r in lines(tmp_path / f"out{i}")])
    assert outs[0] == outs[1]


class _Explodes(Attack):
    """Test attack that raises."""

    name = "explodes"

    def perturb(self, model, x, y, eps, target):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")


class _NaN(Attack):
    """Test attack that returns NaN."""

    name = "nan"

    def perturb(self, model, x, y, eps, target):  # type: ignore[no-untyped-def]
        return torch.full_like(x, float("nan"))


@pytest.fixture
def failing_attacks():
    ATTACKS._load()
    for cls in (_Explodes, _NaN):
        ATTACKS.register(cls)
    yield
    for cls in (_Explodes, _NaN):
        ATTACKS._items.pop(cls.name)


def test_a_failing_cell_does_not_stop_the_grid(tmp_path: Path, data_dir: Path, cache_dir: Path,
                                               failing_attacks: None) -> None:
    extra = '[[attacks]]\nname = "explodes"\neps = 0.1\n[[attacks]]\nname = "nan"\neps = 0.1\n'
    suite = load_suite(tiny_suite(tmp_path / "s.toml", extra=extra))
    summary = run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    assert summary.exit_code == 1 and len(summary.errors) == 2
    records = lines(tmp_path / "out")
    errors = {r["attack"]: r["error"] for r in records if r["error"]}
    assert errors == {"explodes": "RuntimeError: boom", "nan": "AttackFailed: nan produced NaN or inf values"}
    assert sum(r["error"] is None for r in records) == 4
    assert "| error" in (tmp_path / "out" / "leaderboard.md").read_text()
    summary = run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    assert summary.computed == 2 and summary.resumed == 4  # failed cells are retried, the rest resumed


def test_blackbox_never_backpropagates_through_the_target(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    extra = '[[attacks]]\nname = "fgsm"\neps = 0.3\nthreat = "blackbox"\n[blackbox]\nrounds = 2\nepochs = 2\n'
    suite = load_suite(tiny_suite(tmp_path / "s.toml", extra=extra))
    cell = next(c for c in expand(suite) if c.threat == "blackbox")
    ctx = Context(settings(data_dir, cache_dir))
    target = ctx.models.model(cell)
    ctx.probe(cell)  # the harness's own gradient probe of the defended model, before the attacker's turn
    grad_forwards, backwards = [], []
    target.register_forward_hook(lambda m, i, o: grad_forwards.append(torch.is_grad_enabled()))
    target.register_full_backward_hook(lambda m, gi, go: backwards.append(1))
    record = run_cell(cell, ctx)
    assert backwards == [] and grad_forwards and not any(grad_forwards)
    assert record["label_queries"] == 150 * 2 ** 2
    assert record["substitute_agreement"] >= 0.5
    white = run_cell(next(c for c in expand(suite) if c.threat == "whitebox" and c.eps == 0.3), ctx)
    assert record["robust_acc"] >= white["robust_acc"]
    assert ctx.models.calls["clean"] == 1 and ctx.models.calls["substitute"] == 1


def test_leaderboard_rerenders_identically(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    rendered = (tmp_path / "out" / "leaderboard.md").read_text()
    leaderboard.write(tmp_path / "out")
    assert (tmp_path / "out" / "leaderboard.md").read_text() == rendered


def test_local_executor_reuses_one_context(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite = load_suite(tiny_suite(tmp_path / "s.toml", eps="[0.05, 0.1, 0.2, 0.3]"))
    ctx = Context(settings(data_dir, cache_dir))
    run(suite, tmp_path / "out", ctx.settings, executor=LocalExecutor(ctx), progress=False)
    assert ctx.models.calls["model"] == 1 and ctx.models.calls["clean"] == 1 and ctx.models.calls["data"] == 1


def test_a_resumed_run_trains_nothing_even_with_an_empty_cache(tmp_path: Path, data_dir: Path,
                                                                 cache_dir: Path) -> None:
    """Figures re-render from the records (the example sheet included): a finished results directory copied to a
    machine without the model cache resumes every cell and trains no model."""
    suite = load_suite(tiny_suite(tmp_path / "s.toml"))
    run(suite, tmp_path / "out", settings(data_dir, cache_dir), progress=False)
    assert (tmp_path / "out" / "plots" / "mnist-adversarial-examples.png").is_file()
    (tmp_path / "out" / "plots" / "mnist-adversarial-examples.png").unlink()
    ctx = Context(settings(data_dir, tmp_path / "empty-cache"))
    summary = run(suite, tmp_path / "out", ctx.settings, executor=LocalExecutor(ctx), progress=False)
    assert summary.computed == 0 and summary.resumed == 4
    assert ctx.models.calls["trainings"] == 0 and ctx.models.calls["model"] == 0
    assert (tmp_path / "out" / "plots" / "mnist-adversarial-examples.png").is_file()


def test_only_runs_a_slice_and_slices_fill_the_same_grid(tmp_path: Path, data_dir: Path, cache_dir: Path) -> None:
    suite, out = load_suite(tiny_suite(tmp_path / "s.toml")), tmp_path / "out"
    first = run(suite, out, settings(data_dir, cache_dir), progress=False, only=["threat=wb", "eps=0.3"])
    assert (first.total, first.computed) == (1, 1)
    assert [(r["threat_label"], r["eps"]) for r in lines(out)] == [("wb", 0.3)]
    assert len(json.loads((out / leaderboard.PLAN).read_text())["cells"]) == 4  # the plan is the whole suite's
    assert "1 of 4" in (out / "leaderboard.md").read_text()
    second = run(suite, out, settings(data_dir, cache_dir), progress=False, only=["eps=0.1,0.3", "threat=wb"])
    assert (second.resumed, second.computed) == (1, 1)
    rest = run(suite, out, settings(data_dir, cache_dir), progress=False)
    assert (rest.resumed, rest.computed) == (2, 2) and len(lines(out)) == 4
    again = run(suite, out, settings(data_dir, cache_dir), progress=False, only=["threat=bpda"], fresh=True)
    assert (again.resumed, again.computed) == (0, 2)
    assert not (out / "cells.stale.jsonl").exists() or all(
        json.loads(line)["threat"] == "bpda" for line in (out / "cells.stale.jsonl").read_text().splitlines())
    assert len(lines(out)) == 4  # --fresh with --only recomputed the slice and kept the other cells


def test_cells_of_other_weights_are_recomputed_never_mixed(tmp_path: Path, data_dir: Path, cache_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A results directory whose model was lost from the cache and retrained to other weights (here: another
    training thread count) keeps no cell of the old weights beside the new ones: once a run has the new model in
    the cache, the old cells go to cells.stale.jsonl and are computed again in that run, so the worst case
    describes one model."""
    from bench import train
    out = tmp_path / "out"
    run(load_suite(tiny_suite(tmp_path / "s.toml")), out, settings(data_dir, cache_dir), progress=False)
    old = lines(out)
    assert len({r["weights"] for r in old}) == 1 and old[0]["weights"]
    monkeypatch.setattr(train, "TRAIN_THREADS", 1 if train.TRAIN_THREADS != 1 else 2)
    wider = load_suite(tiny_suite(tmp_path / "s.toml", eps="[0.05, 0.1, 0.3]"))
    other = settings(data_dir, tmp_path / "other-cache")
    with pytest.warns(UserWarning, match="4 records .* other weights than the cached model of mnist none.*computed "
                                         "again$"):
        second = run(wider, out, other, progress=False)  # trains the model for the new eps 0.05 cells, then sees
    new = lines(out)
    assert (second.resumed, second.computed) == (0, 6) and len(new) == 6
    assert len({r["weights"] for r in new}) == 1 and new[0]["weights"] != old[0]["weights"]
    stale = [json.loads(line) for line in (out / "cells.stale.jsonl").read_text().splitlines()]
    assert sorted(r["cell_id"] for r in stale) == sorted(r["cell_id"] for r in old)
    third = run(wider, out, other, progress=False)
    assert (third.resumed, third.computed) == (6, 0) and lines(out) == new
