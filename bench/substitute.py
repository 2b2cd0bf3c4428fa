"""Substitute training for the black-box threat model (Papernot et al., "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017).

Written by hand because neither torchattacks nor ART implements the substitute loop. The attacker holds a few
test images disjoint from the evaluated ones, labels them by querying the target (labels only, never
gradients), trains its own :class:`~bench.models.SubstituteCNN`, and grows its set by Jacobian-based dataset
augmentation: ``S ← S ∪ {x + λ·sign(∂F_sub[label(x)]/∂x)}`` for ``rounds`` rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.models import SubstituteCNN
from bench.train import TrainConfig, fit


def oracle_labels(oracle: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The target's labels for ``x``: forward passes only, under ``no_grad`` (no gradient can flow)."""
    device = next(oracle.parameters()).device
    oracle.eval()
    with torch.no_grad():
        return torch.cat([oracle(x[i:i + batch_size].to(device)).argmax(1).cpu()
                          for i in range(0, len(x), batch_size)])


def jacobian_step(substitute: nn.Module, x: torch.Tensor, labels: torch.Tensor, lam: float) -> torch.Tensor:
    """``clip(x + λ·sign(∂F[label]/∂x), 0, 1)``: the new points of one augmentation round."""
    device = next(substitute.parameters()).device
    substitute.eval()
    out = []
    for i in range(0, len(x), 500):
        xb = x[i:i + 500].to(device).requires_grad_(True)
        logits = substitute(xb)
        picked = logits.gather(1, labels[i:i + 500].to(device)[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, xb)
        out.append((xb.detach() + lam * grad.sign()).clamp(0, 1).cpu())
    return torch.cat(out)


def train_substitute(oracle: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, shape: tuple[int, int, int],
                     settings: dict[str, Any], seed: int, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Train a substitute from the holdout images ``x0`` and a label ``oracle``; returns it and its facts
    (``label_queries``: images the oracle labelled, ``train_size``: the final augmented set)."""
    torch.manual_seed(seed)
    substitute = SubstituteCNN(shape).to(device)
    cfg = TrainConfig(epochs=settings["epochs"], batch_size=min(128, len(x0)), lr=settings["lr"],
                      lr_schedule="constant")
    x, labels = x0, oracle(x0)
    queries = len(x0)
    for round_ in range(settings["rounds"] + 1):
        fit(substitute, x, labels, cfg, seed + round_, device=device, desc=f"substitute round {round_}")
        if round_ == settings["rounds"]:
            break
        new = jacobian_step(substitute, x, labels, settings["lam"])
        new_labels = oracle(new)
        queries += len(new)
        x, labels = torch.cat([x, new]), torch.cat([labels, new_labels])
    return substitute.eval(), {"label_queries": queries, "train_size": len(x)}
