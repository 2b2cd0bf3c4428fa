"""``bench run --dry-run``: what a suite will cost before paying for it.

Lists the cells and the models to train (and which the cache already holds), then estimates the wall time on the
chosen device from a short throughput probe: per distinct defended model, two timed training steps (the
defense's own batch transform included, e.g. adversarial training's PGD) and the forward and forward+backward
rates of its untrained network at the attack batch size. Cells are costed at their upper bound (every image takes
every step: ``Attack.passes``); the step savings usually cut that several-fold on breakable models.
Written by hand: it prices the harness's own plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench.attacks import REGISTRY as ATTACKS
from bench.craft import attack_batch
from bench.evaluate import Context
from bench.grid import Cell
from bench.runner import artifacts
from bench.threats import REGISTRY as THREATS
from bench.train import TrainConfig, loss_fn

TRAIN_IMAGES = {"mnist": 60_000, "cifar10": 50_000}


@dataclass
class Rates:
    """Images per second of one network: forward, forward+backward, and seconds per training batch."""

    forward: float
    backward: float
    train_batch: float


@dataclass
class Estimate:
    cells: int
    computations: int
    trainings: list[tuple[str, bool, float]]  # (label, cached, seconds)
    attack_seconds: float
    device: str

    @property
    def train_seconds(self) -> float:
        return sum(s for _, cached, s in self.trainings if not cached)

    def describe(self) -> str:
        total = self.train_seconds + self.attack_seconds
        todo = [t for t in self.trainings if not t[1]]
        lines = [f"{self.cells} cells ({self.computations} distinct computations)",
                 f"{len(self.trainings)} models ({len(todo)} to train, {len(self.trainings) - len(todo)} cached):"]
        lines += [f"  {label}: {'cached' if cached else f'~{_duration(seconds)} to train'}"
                  for label, cached, seconds in self.trainings]
        lines += [f"attacks: at most ~{_duration(self.attack_seconds)} (every image takes every step; the step savings "
                  f"usually cut this several-fold)",
                  f"estimated wall time on {self.device}: at most ~{_duration(total)} "
                  f"({_duration(self.train_seconds)} training + {_duration(self.attack_seconds)} attacks)"]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def wait_for_device() -> None:
    """Wait for queued GPU kernels: CUDA calls return before their work is done, so a timer must wait first."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _time(fn: Any, repeats: int = 2) -> float:
    fn()  # warm-up
    wait_for_device()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    wait_for_device()
    return (time.perf_counter() - start) / repeats


def probe_rates(ctx: Context, cell: Cell) -> Rates:
    """Throughput of the cell's defended network (untrained) on the device, with its training step."""
    models = ctx.models
    defense = models.defense(cell)
    device = ctx.settings.device
    model = defense.build().to(device)
    cfg: TrainConfig = models.train_config(cell)
    batch = attack_batch(cell.dataset, device)
    x = torch.rand(batch, *cell.dataset.shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def backward() -> None:
        xb = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xb), y), xb)

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-6)
    xt, yt = x[:cfg.batch_size], y[:cfg.batch_size]

    def train_step() -> None:
        xb, yb = defense.training_batch(model, xt, yt, progress=0.5)
        model.train()
        loss = loss_fn(cfg.loss, model(xb), yb)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        model.eval()

    return Rates(batch / _time(forward), batch / _time(backward), _time(train_step))


def estimate(cells: list[Cell], ctx: Context) -> Estimate:
    """The cost of ``cells`` (see the module docstring)."""
    models = ctx.models
    rates: dict[str, Rates] = {}

    def rate(cell: Cell) -> Rates:
        key = models.model_label(cell) + cell.dataset.value
        if key not in rates:
            rates[key] = probe_rates(ctx, cell)
        return rates[key]

    trainings = []
    for kind, needed in artifacts(cells, ctx):
        label, fields = models.artifact(kind, needed)
        name = f"{needed.dataset.value} {label}"
        if models.cache.exists(needed.dataset.value, label, fields):
            trainings.append((name, True, 0.0))
            continue
        seconds = _train_seconds(kind, needed, models.train_config(needed), rate(needed))
        done = models.cache.progress(needed.dataset.value, label, fields, ctx.settings.device)
        if done is not None:
            name, seconds = f"{name} (resumes {100 * done:.0f} % done)", seconds * (1 - done)
        trainings.append((name, False, seconds))
    seen: set[str] = set()
    attack_seconds = 0.0
    for cell in cells:
        threat = THREATS.get(cell.threat)()
        key = (cell.compute_key if not threat.transfer else
               f"{cell.threat}:{cell.attack}:{cell.attack_values}:{cell.eps}:{repr(cell.threat_params)}")
        if key in seen:
            continue
        seen.add(key)
        attack = ATTACKS.get(cell.attack)(cell.attack_values)
        forwards, backwards = attack.passes()
        attempts = cell.n * (9 if attack.target_mode == "all" else 1)
        r = rate(cell if cell.threat != "oblivious" else THREATS.get("oblivious").undefended(cell))
        attack_seconds += attempts * (forwards / r.forward + backwards / r.backward)
    return Estimate(len(cells), len(seen), trainings, attack_seconds, ctx.settings.device)


def _train_seconds(kind: str, cell: Cell, cfg: TrainConfig, r: Rates) -> float:
    if kind == "substitute":
        p = cell.threat_params
        images = sum(p["holdout"] * 2 ** k for k in range(p["rounds"] + 1)) * p["epochs"]
        return images / r.backward
    size = cfg.train_limit or TRAIN_IMAGES[cell.dataset.value]
    batches = cfg.epochs * math.ceil(size / cfg.batch_size)
    return batches * r.train_batch + 10_000 / r.forward  # training, then the test-set accuracy
