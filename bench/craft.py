"""Running one attack on a set of images: targets, batches, seeds, query counting and output checks.

The attack gets the model its threat model allows (:class:`bench.threats.Source`) and returns raw adversarial
inputs; the caller projects and scores them on the defended model. Attacks that run the harness's own step loop
(``Attack.pooled``, see :mod:`bench.attacks._steps`) get every image at once with a batch size and drop each
image from their batch as soon as its answer is known.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bench.attacks.base import Attack, Runtime
from bench.errors import Interrupted
from bench.types import Dataset

IMAGE_BYTES = {Dataset.MNIST: 1 << 20, Dataset.CIFAR10: 3 << 19}  # attack working memory per image, see attack_batch
CPU_MAX_BATCH = 256


class AttackFailed(Exception):
    """An attack produced unusable output (NaN/inf, wrong shape)."""


class CountingModel(nn.Module):
    """Counts the images ``model`` is queried on (forward) and back-propagated through (backward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0
        self.train(model.training)  # a new Module is in training mode; torchattacks restores what it finds here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.forwards += x.shape[0]
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: torch.Tensor) -> None:
        self.backwards += grad.shape[0]


@dataclass
class Crafted:
    """Raw adversarial inputs (on the CPU, one per attempt) and what the attack spent on them."""

    x_adv: torch.Tensor
    forwards: int
    backwards: int
    stats: dict[str, Any] = field(default_factory=dict)


def attack_batch(dataset: Dataset, device: str) -> int:
    """Images per attack call: the largest power of two whose working memory (``IMAGE_BYTES``: about twice the
    measured peak of a forward+backward pass, 0.47 MiB per image on MNIST and 0.65 on CIFAR-10 for the heaviest
    defense, DQA) fits in an eighth of the device's *total* memory; on a CPU at most ``CPU_MAX_BATCH``.

    The CPU cap is measured on 2 cores (results/perf.md): forward+backward images/s is flat from 128 to 512 images
    on MNIST (64 to 256 on CIFAR-10) and 15-20 % lower beyond, when the activations fall out of cache. Total
    rather than free memory keeps the choice the same on every run of a machine: the batch does not change
    FGSM/BIM/PGD/JSMA results (bit for bit), but attacks that decide per batch change with it (C&W's early stop,
    HSJA's starting points, Square's seeds).
    """
    if device.startswith("cuda"):
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = 1 << max(0, (memory // 8 // IMAGE_BYTES[dataset]).bit_length() - 1)
    return fits if device.startswith("cuda") else min(fits, CPU_MAX_BATCH)


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 500].to(device)).cpu() for i in range(0, len(x), 500)])


def choose_targets(mode: str, y: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image index of each attempt, target labels or None). Targets never equal the true label."""
    n, classes = len(y), 10
    index = torch.arange(n)
    if mode == "none":
        return index, None
    if mode == "random":
        return index, (y + torch.randint(1, classes, (n,), generator=generator)) % classes
    if mode == "next":
        return index, (y + 1) % classes
    if mode == "least_likely":
        scores = logits(x).clone()
        scores[index, y] = float("inf")
        return index, scores.argmin(1)
    if mode == "all":
        rep = index.repeat_interleave(classes - 1)
        offsets = torch.arange(1, classes).repeat(n)
        return rep, (y[rep] + offsets) % classes
    raise ValueError(f"unknown target mode {mode!r}")


def craft(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None,
          eps: float | None, seed: int, runtime: Runtime, ids: torch.Tensor | None = None) -> Crafted:
    """Run ``attack`` on ``model`` for the attempts (x, y, targets), seeded; raw output, projected by the caller.
    ``ids``: the attempts' indices within the cell (default 0..len(x)-1)."""
    counted = CountingModel(model)
    attack.runtime = replace(runtime, ids=torch.arange(len(x)) if ids is None else ids)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if attack.pooled:
            chunks = [(0, len(x))]
        else:
            chunks = [(i, min(i + runtime.batch, len(x))) for i in range(0, len(x), runtime.batch)]
        for lo, hi in chunks:
            if runtime.should_stop():
                raise Interrupted
            xb, yb = x[lo:hi], y[lo:hi]
            tb = None if targets is None else targets[lo:hi]
            if not attack.pooled:
                xb, yb = xb.to(runtime.device), yb.to(runtime.device)
                tb = None if tb is None else tb.to(runtime.device)
            adv = attack.perturb(counted, xb, yb, eps, tb) if len(xb) else xb
            if not isinstance(adv, torch.Tensor) or adv.shape != xb.shape:
                raise AttackFailed(f"{attack.name} returned {getattr(adv, 'shape', type(adv).__name__)}, "
                                   f"expected {tuple(xb.shape)}")
            if not torch.isfinite(adv).all():
                raise AttackFailed(f"{attack.name} produced NaN or inf values")
            out.append(adv.detach().cpu())
    x_adv = torch.cat(out) if out else x.clone()
    return Crafted(x_adv, counted.forwards, counted.backwards, dict(attack.stats))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | None, norm: str) -> torch.Tensor:
    """Clip to [0, 1] and into the eps ball around ``x`` (L∞ or L2); the harness never trusts the attack."""
    if eps is not None:
        delta = x_adv - x
        if norm == "l2":
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (eps / norms).clamp(max=1.0).view(-1, *[1] * (delta.dim() - 1))
        else:
            delta = delta.clamp(-eps, eps)
        x_adv = x + delta
    return x_adv.clamp(0.0, 1.0)
