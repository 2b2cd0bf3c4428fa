"""Network shapes for both datasets."""

from __future__ import annotations

import pytest
import torch

from bench.models import CleverhansCNN, DefendedModel, SubstituteCNN, predict
from bench.types import Dataset


@pytest.mark.parametrize("dataset", list(Dataset))
def test_cleverhans_cnn_layers_and_logits(dataset: Dataset) -> None:
    model = CleverhansCNN(dataset.shape)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (64, (8, 8), (2, 2)), (128, (6, 6), (2, 2)), (128, (5, 5), (1, 1))]
    x = torch.rand(4, *dataset.shape)
    side = dataset.shape[1] // 2
    assert model.features[0](x).shape == (4, 64, side, side)  # 'same' padding with stride 2
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("dataset", list(Dataset))
def test_substitute_is_a_different_architecture(dataset: Dataset) -> None:
    substitute = SubstituteCNN(dataset.shape)
    assert substitute(torch.rand(2, *dataset.shape)).shape == (2, 10)
    assert sum(p.numel() for p in substitute.parameters()) != sum(
        p.numel() for p in CleverhansCNN(dataset.shape).parameters())


def test_a_randomized_model_predicts_the_same_whatever_ran_before() -> None:
    """``predict`` seeds torch's RNG for its call (and restores it): clean and adversarial scores of a randomized
    defense are reproducible, and the caller's random stream is left as it was."""

    class Noise(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.rand_like(x)

    model = DefendedModel(Noise(), CleverhansCNN((1, 28, 28)))
    x = torch.zeros(600, 1, 28, 28)
    torch.manual_seed(1)
    first = predict(model, x)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    assert torch.equal(predict(model, x), first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(predict(model, x, seed=1), first)
