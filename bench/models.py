"""The classifiers: the Cleverhans basic CNN of the QuSecNets paper, the black-box substitute, and their
composition with a defense into one ``nn.Module`` that takes images in [0, 1] and returns logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ActivationFactory = Callable[[], nn.Module]


class CleverhansCNN(nn.Module):
    """Conv(64, 8×8, s2, same) → act → Conv(128, 6×6, s2, valid) → act → Conv(128, 5×5, s1, valid) → act →
    Flatten → Dense(10). ``activation`` builds each activation (ReLU by default; defenses swap in BReLU or
    quantized activations). With padding 3 the first layer is 'same' for both 28×28 and 32×32 inputs."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 10, activation: ActivationFactory = nn.ReLU) -> None:
        super().__init__()
        c, h, _ = shape
        side = ((h + 1) // 2 - 6) // 2 + 1 - 4
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 8, stride=2, padding=3), activation(),
            nn.Conv2d(64, 128, 6, stride=2), activation(),
            nn.Conv2d(128, 128, 5, stride=1), activation(),
            nn.Flatten(),
        )
        self.logits = nn.Linear(128 * side * side, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


class SubstituteCNN(nn.Module):
    """The black-box attacker's own model, deliberately a different architecture from the target (Papernot et al.
    2017, substitute "A"): Conv(32, 3×3) → ReLU → MaxPool 2 → Conv(64, 3×3) → ReLU → MaxPool 2 → Dense(200) →
    ReLU → Dense(200) → ReLU → Dense(10)."""

    def __init__(self, shape: tuple[int, int, int], classes: int = 10) -> None:
        super().__init__()
        c, h, _ = shape
        side = ((h - 2) // 2 - 2) // 2
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * side * side, 200), nn.ReLU(),
            nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DefendedModel(nn.Module):
    """``classifier(preprocess(x))``: what every attack sees, one differentiable module on [0, 1] inputs."""

    def __init__(self, preprocess: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(x))


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500, seed: int = 0) -> torch.Tensor:
    """Predicted labels of ``model`` on ``x`` in eval mode, batched. torch's RNG is seeded with ``seed`` for the
    call and restored after it, so a randomized defense scores the same in every run, whatever ran before."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.cat([model(x[i:i + batch_size].to(device)).argmax(1).cpu()
                         for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out
