"""``bench perf``: how fast the harness attacks, against the model's own speed limit and the attack libraries.

In one process, on one model and the same real test images: (a) a forward pass, (b) a forward+backward pass
w.r.t. the input, (c) each attack through ``Context.craft`` (the code ``bench run`` runs, batching included),
(d) the same attack called directly in torchattacks, (e) in ART. :func:`render` says how; ``results/perf.md``
keeps the numbers, and :func:`write` replaces only its measured block, keeping hand-measured sections.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchattacks
from art.attacks.evasion.carlini import CarliniL2Method
from art.attacks.evasion.fast_gradient import FastGradientMethod
from art.attacks.evasion.iterative_method import BasicIterativeMethod
from art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch import (
    ProjectedGradientDescentPyTorch,
)
from art.attacks.evasion.saliency_map import SaliencyMapMethod
from art.estimators.classification import PyTorchClassifier
from tabulate import tabulate
from torch import nn

from bench.craft import CountingModel, Crafted, attack_batch, choose_targets
from bench.estimate import wait_for_device
from bench.evaluate import Context, craft_cell
from bench.settings import Settings, available_cores
from bench.grid import expand
from bench.models import predict
from bench.suite import parse
from bench.types import Dataset

TRAIN = {"epochs": 1, "train_limit": 5000}
EPS = {Dataset.MNIST: 0.3, Dataset.CIFAR10: 8 / 255}
STEPS, CW_STEPS = 10, 30
CW_C = 100.0  # large enough that torchattacks' early stop (cost rising) does not end C&W before its 30 steps
CW_LR = 0.01  # one Adam learning rate for the harness and both libraries
ATTACKS = ("fgsm", "bim", "pgd", "cw_l2", "jsma")
BEGIN, END = "<!-- bench perf: begin -->", "<!-- bench perf: end -->"

Library = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None", int], Any]


@dataclass(frozen=True)
class Case:
    """One attack: its suite entry, the images the harness attacks, and the libraries' calls of it with their
    image counts (fewer for the slow ones)."""

    entry: dict[str, Any]
    images: int
    libraries: dict[str, tuple[int, Library]]


def _torchattacks(make: Callable[[nn.Module], Any]) -> Library:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, batch: int) -> None:
        attack = make(model)
        if target is not None:
            attack.set_mode_targeted_by_label(quiet=True)
        for i in range(0, len(x), batch):
            attack(x[i:i + batch], (y if target is None else target)[i:i + batch])
    return run


def _art(make: Callable[[PyTorchClassifier, int], Any]) -> Library:
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, batch: int) -> None:
        classifier = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                       nb_classes=10, clip_values=(0.0, 1.0))
        make(classifier, batch).generate(x.numpy(), y=(y if target is None else target).numpy())
    return run


def _art_cw(classifier: PyTorchClassifier, batch: int) -> CarliniL2Method:
    return CarliniL2Method(classifier, confidence=0.0, learning_rate=CW_LR, binary_search_steps=1, max_iter=CW_STEPS,
                           initial_const=CW_C, batch_size=batch, verbose=False)


def cases(dataset: Dataset, images: int, batch: int) -> list[Case]:
    """The measured attacks. The harness runs JSMA on one attack batch, as ``bench run`` does; the slow library
    implementations run on fewer images (ART's C&W and JSMA 50, ART's C&W at its default batch of 1 image 10,
    torchattacks' JSMA 20, on CIFAR-10 1). The card's C&W figure (ART 0.8 images/s) is ART at its default batch
    size; the equal-batch row is the fair comparison of the two loops, and both are shown."""
    eps = EPS[dataset]
    alpha = 2.5 * eps / STEPS
    few = min(images, 50)
    slowest = 20 if dataset is Dataset.MNIST else 1  # torchattacks' JSMA: ~3 images/s on MNIST, ~0.05 on CIFAR-10
    return [
        Case({"name": "fgsm", "eps": eps}, images, {
            "torchattacks": (images, _torchattacks(lambda m: torchattacks.FGSM(m, eps=eps))),
            "ART": (images, _art(lambda c, b: FastGradientMethod(c, eps=eps, batch_size=b)))}),
        Case({"name": "bim", "eps": eps, "steps": STEPS}, images, {
            "torchattacks": (images, _torchattacks(lambda m: torchattacks.BIM(m, eps=eps, alpha=alpha, steps=STEPS))),
            "ART": (images, _art(lambda c, b: BasicIterativeMethod(c, eps=eps, eps_step=alpha, max_iter=STEPS,
                                                                   batch_size=b, verbose=False)))}),
        Case({"name": "pgd", "eps": eps, "steps": STEPS}, images, {
            "torchattacks": (images, _torchattacks(lambda m: torchattacks.PGD(m, eps=eps, alpha=alpha, steps=STEPS))),
            "ART": (images, _art(lambda c, b: ProjectedGradientDescentPyTorch(
                c, eps=eps, eps_step=alpha, max_iter=STEPS, num_random_init=1, batch_size=b, verbose=False)))}),
        Case({"name": "cw_l2", "steps": CW_STEPS, "c": CW_C, "lr": CW_LR}, images, {
            "torchattacks": (images, _torchattacks(lambda m: torchattacks.CW(m, c=CW_C, kappa=0.0, steps=CW_STEPS,
                                                                              lr=CW_LR))),
            "ART": (few, _art(_art_cw)),
            "ART, batch 1 (its default)": (min(images, 10), _art(lambda c, b: _art_cw(c, 1)))}),
        Case({"name": "jsma", "target": "random"}, min(images, batch), {
            "torchattacks": (min(few, slowest), _torchattacks(lambda m: torchattacks.JSMA(m, theta=1.0, gamma=0.1))),
            "ART": (few, _art(lambda c, b: SaliencyMapMethod(c, theta=1.0, gamma=0.1, batch_size=b, verbose=False)))}),
    ]


@dataclass
class Row:
    measurement: str
    implementation: str
    images: int
    rates: list[float]
    k: float | None = None
    passes: tuple[float, float] = (0.0, 0.0)  # forward and backward images per image

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def _rates(images: int, repeats: int, work: Callable[[], Any]) -> list[float]:
    rates = []
    for _ in range(repeats):
        wait_for_device()
        start = time.perf_counter()
        work()
        wait_for_device()
        rates.append(images / (time.perf_counter() - start))
    return rates


def _passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, backward: bool) -> None:
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        if backward:
            xb = xb.clone().requires_grad_(True)
            torch.autograd.grad(nn.functional.cross_entropy(model(xb), yb), xb)
        else:
            with torch.inference_mode():
                model(xb)


def measure(dataset: Dataset, settings: Settings, images: int, repeats: int,
            only: tuple[str, ...] = ()) -> tuple[list[Row], dict[str, Any]]:
    """The rows of the table and the facts of the setup. (b) is measured again before each attack and its rates
    pooled, so that the speed limit drifts with the machine as the attacks do."""
    batch = settings.batch or attack_batch(dataset, settings.device)
    selected = [c for c in cases(dataset, images, batch) if not only or c.entry["name"] in only]
    raw = {"name": "perf", "datasets": {dataset.value: {"n": images, **TRAIN}}, "defenses": [{"name": "none"}],
           "attacks": [{**c.entry, "threat": "whitebox"} for c in selected], "checks": {"convergence": False}}
    cells = {c.attack: c for c in expand(parse(raw, "<bench perf>"))}
    ctx = Context(settings)
    first = next(iter(cells.values()))
    model = ctx.models.model(first)
    _, x, y = ctx.models.eval_set(first)
    _passes(model, x, y, batch, backward=True)  # warm-up
    rows = [Row("(a) forward", "model", images, _rates(images, repeats, lambda: _passes(model, x, y, batch, False)),
                passes=(1.0, 0.0)),
            Row("(b) forward+backward", "model", images,
                _rates(images, repeats, lambda: _passes(model, x, y, batch, True)), k=1.0, passes=(1.0, 1.0))]
    limit = rows[1]
    for case in selected:
        limit.rates += _rates(images, repeats, lambda: _passes(model, x, y, batch, True))
        cell = replace(cells[case.entry["name"]], n=case.images)
        craft_cell(replace(cell, n=1), ctx, model)  # warm-up: first calls pay one-off costs (imports)
        counted: list[Crafted] = []
        rates = _rates(case.images, repeats, lambda: counted.append(craft_cell(cell, ctx, model)[0]))
        k = None if cell.targeted else counted[-1].backwards / case.images
        rows.append(Row(cell.attack_id, "harness", case.images, rates, k, _per_image(counted[-1], case.images)))
        for library, (n, run) in case.libraries.items():
            _, xs, ys = ctx.models.eval_set(replace(cell, n=n))
            target = choose_targets(cell.attack_values.get("target", "none"), ys, lambda _: ys, xs,
                                    torch.Generator().manual_seed(cell.cell_seed))[1]
            run(model, xs[:1], ys[:1], None if target is None else target[:1], batch)
            wrapped = CountingModel(model)
            rates = _rates(n, repeats, lambda: run(wrapped, xs, ys, target, batch))
            rows.append(Row(cell.attack_id, library, n, rates, k, _per_image(wrapped, n * repeats)))
    clean = float((predict(model, x) == y).float().mean())
    facts = {"dataset": dataset.value, "batch": batch, "threads": torch.get_num_threads(), "repeats": repeats,
             "device": settings.device, "clean_acc": round(clean, 3), "images": images}
    return rows, facts


def _per_image(counted: CountingModel | Crafted, images: int) -> tuple[float, float]:
    return counted.forwards / images, counted.backwards / images


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def render(rows: list[Row], facts: dict[str, Any], command: str) -> str:
    """The measured block of ``results/perf.md``: how it was measured, then the table."""
    limit = next(r.rate for r in rows if r.measurement.startswith("(b)"))
    harness = {r.measurement: r.rate for r in rows if r.implementation == "harness"}
    table = []
    for r in rows:
        ratio = harness[r.measurement] / r.rate if r.measurement in harness and r.implementation != "harness" else None
        table.append([r.measurement, r.implementation, r.images, _fmt(r.rate),
                      f"{_fmt(min(r.rates))}–{_fmt(max(r.rates))}", f"{r.passes[0]:.3g}", f"{r.passes[1]:.3g}",
                      "" if r.k is None else f"{r.k:g}", "" if r.k is None else f"{r.rate * r.k / limit:.2f}",
                      "" if ratio is None else f"{ratio:.1f}×"])
    header = ["measurement", "implementation", "images", "images/s (median)", "min–max", "forward/image",
              "backward/image", "k", "efficiency", "harness ÷ this"]
    return "\n".join([
        BEGIN,
        f"## Attack throughput ({facts['dataset']})",
        "",
        " ".join([
            f"`{command}`: {facts['threads']} torch threads on {platform.machine()} ({available_cores()} cores), "
            f"device {facts['device']}, torch {torch.__version__}. Each measurement runs {facts['repeats']} times: median, "
            "min–max beside it; (b) is measured again before each attack and pooled.",
            f"Model: undefended Cleverhans CNN trained {TRAIN['epochs']} epoch on the first "
            f"{TRAIN['train_limit']:,} training images through the model cache (clean accuracy "
            f"{facts['clean_acc']:.3f} on the inputs, the first {facts['images']:,} test images).",
            f"Batches of {facts['batch']} images (`bench.evaluate.attack_batch` unless `--batch`) for the model rows, "
            "the harness and the direct library calls alike.",
            f"Eps {EPS[Dataset(facts['dataset'])]:.4g}; BIM and PGD {STEPS} steps; C&W-L2 {CW_STEPS} Adam steps, "
            f"c = {CW_C:g}, lr = {CW_LR:g} (ART: 1 binary-search step of {CW_STEPS} iterations, its default line search); "
            "JSMA theta 1, gamma 0.1, the harness's seeded random targets.",
            "ART's C&W runs once at the common batch (the fair comparison of the two loops) and once at its own "
            "default batch of 1 image, as a user calling it with defaults gets it.",
            "The library calls attack the model wrapped in the harness's `CountingModel`, which counts the forward "
            "and backward images per image and costs nothing measurable.",
            "k = gradient steps per image as the harness counted them, the same for the library rows (same steps); "
            "efficiency = images/s · k / (b): 1.0 is the model's speed limit. JSMA's work per image depends on when "
            "the image reaches its target: compare its images/s.",
        ]),
        "",
        tabulate(table, headers=header, tablefmt="github", disable_numparse=True),
        END,
    ])


def write(path: Path, block: str) -> None:
    """Replace the measured block of ``path``, keeping whatever else the file holds (hand-measured sections)."""
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = block + "\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
