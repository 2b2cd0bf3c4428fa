"""Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner, ICML 2018).

Written by hand because no attack library offers it as a model transform: torchattacks and ART attack whatever
``nn.Module`` they are given. :func:`bpda_model` returns a copy of a defended model in which every
gradient-masking module keeps its exact forward pass but back-propagates through an approximation: the identity
(straight-through) or a smooth stand-in the module provides. A module opts in by defining
``bpda_approx(backward: str, z: float) -> nn.Module | None`` (None means identity).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class _BPDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: nn.Module, approx: nn.Module | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.approx = approx
        with torch.no_grad():
            return module(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.approx is None:
            return grad, None, None
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.approx(leaf), leaf, grad)
        return grad_x, None, None


class BPDA(nn.Module):
    """Forward exactly as ``module``; backward as the identity (``approx`` None) or as ``approx``."""

    def __init__(self, module: nn.Module, approx: nn.Module | None) -> None:
        super().__init__()
        self.module = module
        self.approx = approx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BPDAFunction.apply(x, self.module, self.approx)


def bpda_model(model: nn.Module, backward: str = "identity", z: float = 1.0) -> nn.Module:
    """A copy of ``model`` with each module that defines ``bpda_approx`` wrapped in :class:`BPDA`."""
    model = copy.deepcopy(model)
    _wrap(model, backward, z)
    return model


def _wrap(parent: nn.Module, backward: str, z: float) -> None:
    for name, child in parent.named_children():
        if hasattr(child, "bpda_approx"):
            setattr(parent, name, BPDA(child, child.bpda_approx(backward, z)))
        else:
            _wrap(child, backward, z)


class EOT(nn.Module):
    """Expectation over Transformation (Athalye, Engstrom, Ilyas & Kwok, ICML 2018): the mean logits of
    ``samples`` forward passes of a randomized ``model``, so its input gradient is the mean of theirs."""

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.model = model
        self.samples = samples
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(x) for _ in range(self.samples)]).mean(0)
