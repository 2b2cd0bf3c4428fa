"""Probing a defended model for what decides how it must be attacked (AutoAttack's ``checks.py`` idea): is its
input gradient zero or non-finite (gradient masking: BPDA or gradient-free attacks needed), and is its forward
pass random (EOT needed)? Computed once per model on the evaluated images; the results enter every record and
the ``no-grad`` and ``random`` red flags."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RANDOM_IMAGES = 64


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> dict[str, Any]:
    """``grad_zero``: fraction of images whose input gradient of the cross-entropy is zero, missing or
    non-finite; ``randomized``: two forward passes on the same images differ."""
    device = next(model.parameters()).device
    dead = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(device).requires_grad_(True)
        with torch.enable_grad():
            logits = model(xb)
            if not logits.requires_grad:
                dead += len(xb)
                continue
            loss = F.cross_entropy(logits, y[i:i + batch].to(device), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb, allow_unused=True)
        if grad is None:
            dead += len(xb)
            continue
        flat = grad.flatten(1)
        dead += int(((flat == 0).all(1) | ~torch.isfinite(flat).all(1)).sum())
    sample = x[:RANDOM_IMAGES].to(device)
    with torch.inference_mode():
        randomized = not torch.equal(model(sample), model(sample))
    return {"grad_zero": round(dead / max(len(x), 1), 6), "randomized": randomized}
