"""Error-resilience analysis, step 1 of the QuSecNets method (Khalid, Ali et al. 2019): how much input noise the
undefended CNN tolerates, and which number of quantization levels n follows from it.

Noise of growing strength s (uniform U(−s, s) or Gaussian σ = s, one seeded draw scaled by s, clipped to [0, 1]) is
added to test images; the Maximum Tolerable Noise (MTN) is the largest s whose accuracy loss, and that of every
smaller s, stays ≤ the tolerance. A level count n is acceptable when its quantization error (at most
1/(2(n−1))) stays ≤ MTN and its half-step 1/(2(n−1)) is ≥ eps, so an eps perturbation cannot push a pixel from a
level's centre across a threshold; the fewest such levels (the widest margin over eps) is recommended. Written by
hand: no library has this analysis. :func:`recommend` is the pure rule; ``bench resilience`` prints the analysis
and ``levels = "auto"`` in a suite stands for its recommendation (resolved by the model provider when the
defense is built, so the grid is keyed without training anything).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from tabulate import tabulate

from bench import data as data_mod
from bench.errors import BenchError
from bench.grid import Cell
from bench.models import predict
from bench.suite import DATASET_PARAMS, check_table
from bench.train import TrainConfig
from bench.types import Dataset
from defenses.cq import QuantizationLayer, constant_thresholds

if TYPE_CHECKING:
    from bench.provider import Models

STRENGTHS = tuple(round(0.025 * i, 3) for i in range(21))
IMAGES = 1000
MAX_LEVELS = 16
CQ_Z = 50.0
SLACK = 1e-9


def half_step(levels: int) -> float:
    """1/(2(n−1)): the largest quantization error of n levels, and the distance from a level to a threshold."""
    return 1 / (2 * (levels - 1))


@dataclass(frozen=True)
class Recommendation:
    mtn: float
    levels: int | None
    feasible: tuple[int, ...]
    reason: str


def recommend(strengths: tuple[float, ...], accuracies: tuple[float, ...], eps: float, tolerance: float,
              max_levels: int = MAX_LEVELS) -> Recommendation:
    """MTN of the accuracy curve (``strengths`` ascending from 0) and the recommended n in 2..``max_levels``."""
    if not strengths or strengths[0] != 0 or list(strengths) != sorted(strengths) or len(strengths) != len(accuracies):
        raise ValueError("strengths must ascend from 0 and match the accuracies")
    mtn = 0.0
    for s, accuracy in zip(strengths, accuracies):
        if accuracies[0] - accuracy > tolerance + SLACK:
            break
        mtn = s
    candidates = range(2, max_levels + 1)
    accurate = [n for n in candidates if half_step(n) <= mtn + SLACK]
    robust = [n for n in candidates if half_step(n) >= eps - SLACK]
    feasible = tuple(n for n in accurate if n in robust)
    if feasible:
        n = feasible[0]
        return Recommendation(mtn, n, feasible, f"n = {n} is the fewest levels whose quantization error "
                              f"≤ {half_step(n):.4g} stays within MTN = {mtn:g}, and its half-step {half_step(n):.4g} "
                              f"≥ eps = {eps:g} (feasible: n = {_span(feasible)})")
    too_coarse = [n for n in candidates if n not in accurate]
    too_fine = [n for n in candidates if n not in robust]
    return Recommendation(mtn, None, (), f"no n in 2..{max_levels} meets both constraints: quantization error "
                          f"≤ MTN = {mtn:g} fails for n = {_span(too_coarse)}, half-step ≥ eps = {eps:g} fails for "
                          f"n = {_span(too_fine)}")


def _span(levels: list[int] | tuple[int, ...]) -> str:
    if not levels:
        return "none"
    return str(levels[0]) if len(levels) == 1 else f"{levels[0]}..{levels[-1]}"


@dataclass(frozen=True)
class Analysis:
    dataset: Dataset
    noise: str
    eps: float
    tolerance: float
    images: int
    accuracies: tuple[float, ...]
    errors: dict[int, tuple[float, float]]
    recommendation: Recommendation


def undefended_cell(dataset: Dataset, train: TrainConfig, seed: int) -> Cell:
    """A cell naming the undefended model only (no attack is run on it)."""
    return Cell("resilience", dataset, IMAGES, "first", seed, train, "none", {}, "none", {}, "whitebox", None)


def default_train(dataset: Dataset) -> TrainConfig:
    """The training settings of an empty ``[datasets.<name>]`` table: what a suite uses by default."""
    values = check_table({}, DATASET_PARAMS, "<arguments>", f"datasets.{dataset.value}", dataset)
    return TrainConfig(**{k: values[k] for k in TrainConfig.__dataclass_fields__})


def noise_draw(shape: torch.Size, noise: str, seed: int) -> torch.Tensor:
    """One seeded draw of unit-strength noise: U(−1, 1) or N(0, 1); strength s scales it."""
    generator = torch.Generator().manual_seed(seed)
    if noise == "gaussian":
        return torch.randn(shape, generator=generator)
    return torch.rand(shape, generator=generator) * 2 - 1


def noisy(x: torch.Tensor, strength: float, base: torch.Tensor) -> torch.Tensor:
    return (x + strength * base).clamp(0.0, 1.0)


def analyse(models: Models, cell: Cell, eps: float, noise: str, tolerance: float, images: int = IMAGES,
            max_levels: int = MAX_LEVELS) -> Analysis:
    """Accuracy of the cell's undefended model under noise on the first ``images`` test images, and the rule."""
    model = models.model(replace(cell, defense="none", defense_values={}))
    _, x, y = data_mod.subset(models.data(cell.dataset).test, images, "first", cell.seed)
    base = noise_draw(x.shape, noise, cell.seed)
    accuracies = tuple(round(float((predict(model, noisy(x, s, base)) == y).float().mean()), 4) for s in STRENGTHS)
    errors: dict[int, tuple[float, float]] = {}
    for n in range(2, max_levels + 1):
        layer = QuantizationLayer(constant_thresholds(n), CQ_Z).eval()
        steps = QuantizationLayer(constant_thresholds(n), CQ_Z, hard=True).eval()
        with torch.no_grad():
            errors[n] = (float((layer(x) - x).abs().mean()), float((steps(x) - x).abs().mean()))
    return Analysis(cell.dataset, noise, eps, tolerance, images, accuracies, errors,
                    recommend(STRENGTHS, accuracies, eps, tolerance, max_levels))


def render(analysis: Analysis) -> str:
    """The analysis as text: accuracy per noise strength, the levels table and the recommendation."""
    rec = analysis.recommendation
    clean = analysis.accuracies[0]
    noise_rows = [[f"{s:g}", f"{a:.4f}", f"{clean - a:+.4f}", "yes" if s <= rec.mtn else ""]
                  for s, a in zip(STRENGTHS, analysis.accuracies)]
    level_rows = [[n, f"{half_step(n):.4f}", "yes" if half_step(n) <= rec.mtn + SLACK else "no",
                   "yes" if half_step(n) >= analysis.eps - SLACK else "no", f"{soft:.4f}", f"{hard:.4f}"]
                  for n, (soft, hard) in analysis.errors.items()]
    spread = "U(−s, s)" if analysis.noise == "uniform" else "N(0, s²)"
    return "\n".join([
        f"Error-resilience analysis, {analysis.dataset.value}: undefended CNN, {spread} noise clipped to [0, 1], "
        f"first {analysis.images} test images",
        "",
        tabulate(noise_rows, headers=["strength s", "accuracy", "loss", "≤ MTN"], tablefmt="simple"),
        "",
        f"MTN = {rec.mtn:g}: the largest s with accuracy loss ≤ {analysis.tolerance:g} for it and all smaller s",
        "",
        tabulate(level_rows, headers=["n", "1/(2(n−1))", "error ≤ MTN", f"half-step ≥ eps={analysis.eps:g}",
                                      f"mean |q(x)−x| CQ z={CQ_Z:g}", "mean |q(x)−x| hard"], tablefmt="simple"),
        "",
        f"recommended levels: {rec.reason}" if rec.levels else f"recommended levels: none: {rec.reason}",
    ])


def auto_levels(models: Models, cell: Cell) -> int:
    """The levels ``levels = "auto"`` stands for in ``cell``: the recommendation of the analysis with the cell's
    ``resilience`` settings, on the undefended model of its dataset, training and seed; a :class:`BenchError` when
    no n meets both constraints."""
    settings = cell.resilience or {}
    rec = analyse(models, cell, settings["eps"], settings["noise"], settings["tolerance"]).recommendation
    if rec.levels is None:
        raise BenchError(f'{cell.defense} levels = "auto" on {cell.dataset.value}: {rec.reason}; set explicit '
                         "levels or change [resilience]")
    return rec.levels
