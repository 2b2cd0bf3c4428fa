"""The error-resilience rule (MTN, recommended levels) on fixed curves, the noise, and ``levels = "auto"`` on a
small real MNIST model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.evaluate import Context
from bench.settings import Settings
from bench.grid import expand
from bench.resilience import STRENGTHS, analyse, half_step, noise_draw, noisy, recommend
from bench.suite import parse
from conftest import DATA

DATA_DIR = str(DATA)

CURVE_S = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
CURVE_ACC = (0.99, 0.99, 0.98, 0.975, 0.99, 0.9)


def test_half_step() -> None:
    assert half_step(2) == 0.5 and half_step(3) == 0.25 and abs(half_step(6) - 0.1) < 1e-12


def test_mtn_stops_at_first_loss_beyond_tolerance() -> None:
    assert recommend(CURVE_S, CURVE_ACC, eps=0.1, tolerance=0.01).mtn == 0.2
    assert recommend(CURVE_S, CURVE_ACC, eps=0.1, tolerance=0.015).mtn == 0.4
    assert recommend(CURVE_S, CURVE_ACC, eps=0.1, tolerance=0.0).mtn == 0.1
    assert recommend(CURVE_S, CURVE_ACC, eps=0.1, tolerance=0.1).mtn == 0.5


def test_recommends_fewest_levels_meeting_both_constraints() -> None:
    rec = recommend(CURVE_S, CURVE_ACC, eps=0.1, tolerance=0.01)
    assert rec.feasible == (4, 5, 6)
    assert rec.levels == 4
    assert "n = 4" in rec.reason


def test_boundary_values_count_as_met() -> None:
    rec = recommend((0.0, 0.25, 0.5), (0.99, 0.98, 0.5), eps=0.25, tolerance=0.01)
    assert rec.mtn == 0.25 and rec.levels == 3 and rec.feasible == (3,)


def test_no_levels_names_the_failing_constraints() -> None:
    rec = recommend(CURVE_S, CURVE_ACC, eps=0.3, tolerance=0.01)
    assert rec.levels is None and rec.feasible == ()
    assert "error ≤ MTN = 0.2 fails for n = 2..3" in rec.reason
    assert "half-step ≥ eps = 0.3 fails for n = 3..16" in rec.reason
    too_big = recommend(CURVE_S, CURVE_ACC, eps=0.6, tolerance=0.5, max_levels=8)
    assert too_big.levels is None and "half-step ≥ eps = 0.6 fails for n = 2..8" in too_big.reason
    assert "error ≤ MTN = 0.5 fails for n = none" in too_big.reason


def test_bad_curve_is_refused() -> None:
    with pytest.raises(ValueError):
        recommend((0.1, 0.2), (0.9, 0.8), eps=0.1, tolerance=0.01)
    with pytest.raises(ValueError):
        recommend((0.0, 0.2, 0.1), (0.9, 0.8, 0.7), eps=0.1, tolerance=0.01)


def test_noise_stays_in_unit_interval_and_within_strength() -> None:
    x = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    base = noise_draw(x.shape, "uniform", 0)
    assert torch.equal(base, noise_draw(x.shape, "uniform", 0)) and base.abs().max() <= 1
    for s in STRENGTHS:
        out = noisy(x, s, base)
        assert out.min() >= 0 and out.max() <= 1 and (out - x).abs().max() <= s + 1e-7
    gaussian = noise_draw((100_000,), "gaussian", 0)
    assert abs(gaussian.std() - 1) < 0.02 and gaussian.abs().max() > 1


def suite_text(levels: str, eps: float) -> str:
    return (f'name = "auto"\n[datasets.mnist]\nn = 50\nepochs = 1\ntrain_limit = 2000\n'
            f'[[defenses]]\nname = "cq"\nlevels = {levels}\n[[defenses]]\nname = "tq"\nlevels = "auto"\n'
            f'[[attacks]]\nname = "fgsm"\neps = 0.3\n[resilience]\neps = {eps}\n')


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Context:
    return Context(Settings(data_dir=DATA_DIR, cache_dir=str(tmp_path_factory.mktemp("cache"))))


def test_auto_levels_resolve_to_the_recommendation(ctx: Context) -> None:
    """The grid is keyed without training (the cell keeps "auto"); the model provider resolves it when the
    defense is built, and the record names the resolved defense."""
    import tomllib

    suite = parse(tomllib.loads(suite_text('["auto", 2, 3, 4]', 0.05)), "auto.toml")
    cells = expand(suite)
    auto = [c for c in cells if c.defense_values["levels"] == "auto"]
    assert auto and all(c.resilience == suite.resilience for c in auto)
    assert len({c.key for c in cells}) == len(cells)
    analysis = analyse(ctx.models, cells[0], 0.05, "uniform", 0.01)
    assert analysis.accuracies[0] > 0.5 and len(analysis.accuracies) == len(STRENGTHS)
    chosen = analysis.recommendation.levels
    assert chosen is not None
    assert {ctx.models.defense(c).values["levels"] for c in auto} == {chosen}
    explicit = next(c for c in cells if c.defense == "cq" and c.defense_values["levels"] == 2)
    assert ctx.models.defense(explicit).values["levels"] == 2


def test_auto_levels_without_solution_is_a_clear_error(ctx: Context) -> None:
    import tomllib

    suite = parse(tomllib.loads(suite_text('"auto"', 0.6)), "auto.toml")
    with pytest.raises(BenchError, match=r'levels = "auto" on mnist: no n in 2\.\.16 .*half-step ≥ eps = 0\.6'):
        ctx.models.defense(expand(suite)[0])


def test_cli_prints_table_and_recommendation(ctx: Context, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "auto.toml"
    suite.write_text(suite_text('"auto"', 0.3))
    code = main(["resilience", "--dataset", "mnist", "--suite", str(suite), "--eps", "0.05", "--noise", "gaussian",
                 "--n", "200", "--max-levels", "6", "--data-dir", DATA_DIR, "--cache-dir", ctx.settings.cache_dir,
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    assert "N(0, s²) noise" in out and "first 200 test images" in out
    assert "half-step ≥ eps=0.05" in out and "MTN = " in out and "recommended levels:" in out
    assert "\n  6 " in out and "\n  7 " not in out
