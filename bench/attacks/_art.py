"""What the ART adapters share: the model as an ART ``PyTorchClassifier``, tensor ↔ numpy, seeded numpy RNG.

ART works on numpy arrays and draws from numpy's global RNG (HopSkipJump); :func:`numpy_seeded` seeds it from
the torch RNG, which the runner seeds per cell, and restores it afterwards, so results depend on the cell only.
Under numpy 2 (NEP 50 promotion) ART 1.20.1's HopSkipJump interpolates in float64, which a float32 torch model
rejects, so the classifier casts its inputs back to the model's dtype.
Only ``art.estimators.classification`` and single attack modules are imported: none of them imports torchvision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

CLASSES = 10


class _Cast(nn.Module):
    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


class _Classifier(PyTorchClassifier):
    """ART's classifier whose per-sample class gradients (one label per image: JSMA's target gradients) take one
    backward pass: ART 1.20.1 back-propagates the whole batch once per distinct label, up to 10 times. Each image's
    gradient is the same, since images do not interact in an eval-mode model."""

    def class_gradient(self, x: np.ndarray, label: Any = None, training_mode: bool = False,
                       **kwargs: Any) -> np.ndarray:
        if not (isinstance(label, np.ndarray) and label.shape == (len(x),) and self.all_framework_preprocessing):
            return super().class_gradient(x, label=label, training_mode=training_mode, **kwargs)
        self._model.train(mode=training_mode)
        x_grad = torch.from_numpy(x).to(self._device).requires_grad_(True)
        x_input, _ = self._apply_preprocessing(x_grad, y=None, fit=False, no_grad=False)
        logits = self._model(x_input)[-1]
        picked = logits.gather(1, torch.from_numpy(label).to(self._device).long()[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, x_grad)
        return grad.cpu().numpy()[:, None]


def classifier(model: nn.Module, x: torch.Tensor) -> PyTorchClassifier:
    """``model`` (logits on [0, 1] inputs shaped like ``x``) as an ART classifier on ``x``'s device."""
    cast = _Cast(model, next(model.parameters()).dtype)
    device = torch.cuda.device(x.device) if x.is_cuda else nullcontext()
    with device:  # ART runs on the current CUDA device, so make that the one x is on
        return _Classifier(cast, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=CLASSES,
                           clip_values=(0.0, 1.0), device_type="gpu" if x.is_cuda else "cpu")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def to_tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a).to(device=like.device, dtype=like.dtype)


@contextmanager
def numpy_seeded() -> Iterator[None]:
    """numpy's global RNG seeded from the torch RNG for the duration, then restored."""
    state = np.random.get_state()
    np.random.seed(int(torch.randint(2**31, ())))
    try:
        yield
    finally:
        np.random.set_state(state)
