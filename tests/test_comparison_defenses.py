"""The paper's comparison defenses and PGD adversarial training: feature squeezing against ART and SciPy, Xu et al.'s
detector on real MNIST, BReLU + Gaussian augmentation, quantized activations (levels, STE, dynamic thresholds) and
PGD training batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchattacks
from art.defences.preprocessor import FeatureSqueezing, SpatialSmoothing
from scipy.ndimage import median_filter
from torch import nn

from bench import data as data_mod
from bench.bpda import bpda_model
from bench.cli import main
from bench.models import predict
from bench.train import TrainConfig, fit
from bench.types import Dataset
from conftest import DATA
from defenses import REGISTRY
from defenses.base import Defense
from defenses.dqa import QuantizedActivation
from defenses.squeeze import BitDepth, MedianSmoothing


def defense(name: str, dataset: Dataset = Dataset.MNIST, **given: Any) -> Defense:
    cls = REGISTRY.get(name)
    return cls(dataset, cls.resolve(given, dataset))


@pytest.fixture(scope="module")
def mnist() -> data_mod.Data:
    return data_mod.load(Dataset.MNIST, DATA)


@pytest.fixture(scope="module")
def cifar_test() -> torch.Tensor:
    with pytest.warns(UserWarning, match="not the official release"):
        return data_mod.load(Dataset.CIFAR10, DATA).test.x[:200]


@pytest.fixture(scope="module")
def small_model(mnist: data_mod.Data) -> nn.Module:
    """A quickly trained small MLP on 5,000 real MNIST images (≈ 85 % test accuracy), frozen, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
        fit(model, mnist.train.x, mnist.train.y, TrainConfig(epochs=2, train_limit=5000), seed=0)
    return model.eval().requires_grad_(False)


def test_ids_traits_and_bench_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert defense("squeeze").id == "squeeze(bits=1)"
    assert defense("squeeze", Dataset.CIFAR10).id == "squeeze(bits=5)"
    assert defense("squeeze", squeezer="median").id == "squeeze(median=2x2)"
    assert defense("squeeze", squeezer="both", detect=True).id == "squeeze(bits=1,median=2x2,detect=true)"
    assert defense("brelu").id == "brelu(t=1,sigma=0.3)"
    assert defense("brelu", Dataset.CIFAR10).values["sigma"] == 0.05
    assert defense("dqa", mode="fixed").id == "dqa(bits=2,mode=fixed,adv=pgd)"
    assert defense("advtrain").id == "advtrain(eps=0.3)"
    assert defense("advtrain", steps=3).id == "advtrain(eps=0.3,steps=3)"
    assert defense("advtrain", Dataset.CIFAR10).values == {"eps": 8 / 255, "steps": 7, "step_size": 2 / 255,
                                                           "warmup": 0.0, "epochs": 0}
    assert defense("advtrain").values["warmup"] == 0.2
    assert defense("advtrain", epochs=2).training_overrides() == {"epochs": 2}
    assert defense("advtrain").training_overrides() == {}
    assert defense("squeeze", bits=3).weights_key() == {"defense": "none"}
    assert [REGISTRY.get(n).bpda_variants for n in ("squeeze", "brelu", "dqa", "advtrain")] == [
        ("identity",), (), ("identity",), ()]
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, param in (("squeeze", "median"), ("brelu", "sigma"), ("dqa", "adv_step_size"), ("advtrain", "epochs")):
        assert f"  {name}: " in out and param in out


# --- feature squeezing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_depth_equals_art(bits: int, mnist: data_mod.Data, cifar_test: torch.Tensor) -> None:
    squeeze = BitDepth(bits).eval()
    generator = torch.Generator().manual_seed(bits)
    for x in (mnist.test.x[:200], cifar_test, torch.rand(50, 3, 32, 32, generator=generator)):
        art, _ = FeatureSqueezing(clip_values=(0.0, 1.0), bit_depth=bits)(x.numpy())
        out = squeeze(x)
        assert out.dtype == x.dtype and np.array_equal(out.numpy(), art.astype(np.float32))
        assert len(out.unique()) <= 2 ** bits


@pytest.mark.parametrize("window", [2, 3])
def test_median_equals_art_everywhere_including_borders(window: int, mnist: data_mod.Data,
                                                        cifar_test: torch.Tensor) -> None:
    for x in (mnist.test.x[:200], cifar_test):
        art, _ = SpatialSmoothing(window_size=window, channels_first=True, clip_values=(0.0, 1.0))(x.numpy())
        assert np.array_equal(MedianSmoothing((window, window)).eval()(x).numpy(), art)


@pytest.mark.parametrize("window", [(2, 3), (3, 2), (1, 4), (4, 4)])
def test_rectangular_median_equals_scipy(window: tuple[int, int], cifar_test: torch.Tensor) -> None:
    x = cifar_test[:50]
    expected = median_filter(x.numpy(), size=(1, 1, *window), mode="reflect")
    assert np.array_equal(MedianSmoothing(window).eval()(x).numpy(), expected)


def test_median_boundary_handling_by_hand() -> None:
    """Even window [i − 1, i]: the first pixel's window is the edge pixel twice (half-sample reflection), and of
    two values the larger is taken; a 3-wide window at the edge sees (x0, x0, x1)."""
    row = torch.tensor([1.0, 5.0, 2.0, 8.0, 3.0]).view(1, 1, 1, 5)
    assert MedianSmoothing((1, 2)).eval()(row).flatten().tolist() == [1.0, 5.0, 5.0, 8.0, 8.0]
    assert MedianSmoothing((1, 3)).eval()(row).flatten().tolist() == [1.0, 2.0, 5.0, 3.0, 3.0]


def test_squeeze_uses_the_undefended_weights_without_training(tmp_path: Path) -> None:
    """Feature squeezing is applied to the undefended CNN: one training, shared weights."""
    from bench.evaluate import Context
    from bench.grid import expand
    from bench.settings import Settings
    from bench.suite import parse

    raw = {"datasets": {"mnist": {"n": 10, "epochs": 1, "train_limit": 500}},
           "defenses": [{"name": "squeeze"}, {"name": "none"}], "attacks": [{"name": "fgsm", "eps": 0.1}]}
    squeeze_cell, none_cell = expand(parse(raw, "test"))
    ctx = Context(Settings(data_dir=str(DATA), cache_dir=str(tmp_path)))
    squeezed, undefended = ctx.models.model(squeeze_cell), ctx.models.model(none_cell)
    assert ctx.models.calls["trainings"] == 1
    assert all(torch.equal(a, b) for a, b in zip(squeezed.state_dict().values(), undefended.state_dict().values()))
    x = ctx.models.eval_set(squeeze_cell)[1]
    assert not torch.equal(squeezed.preprocess(x), x)


def test_bit_depth_masks_gradient_and_bpda_restores_it(mnist: data_mod.Data) -> None:
    model = defense("squeeze").build().eval()
    x = mnist.test.x[:8].clone().requires_grad_(True)
    model(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    approx = bpda_model(model, "identity")
    x_bpda = x.detach().clone().requires_grad_(True)
    approx(x_bpda).sum().backward()
    squeezed = BitDepth(1).eval()(x.detach()).requires_grad_(True)
    model.classifier(squeezed).sum().backward()
    assert torch.count_nonzero(x_bpda.grad) > 0 and torch.allclose(x_bpda.grad, squeezed.grad)


def test_detector_flags_five_percent_of_clean_and_most_fgsm(mnist: data_mod.Data, small_model: nn.Module) -> None:
    """Xu et al.'s joint detector (1-bit depth and 2×2 median, MNIST): calibrated on a sample of the first 10,000
    training images, it flags ≈ 5 % of 2,000 other clean training images and most FGSM eps 0.3 examples."""
    detect = defense("squeeze", squeezer="both", detect=True)
    assert isinstance(detect.build().preprocess, nn.Identity)
    detector = detect.detector(small_model, mnist.train.x[:10000])
    assert detector is not None
    clean = detector(mnist.train.x[10000:12000]).float().mean().item()
    x, y = mnist.test.x[:500], mnist.test.y[:500]
    adv = torchattacks.FGSM(small_model, eps=0.3)(x, y)
    assert (predict(small_model, adv) == y).float().mean() < 0.2
    flagged = detector(adv).float().mean().item()
    assert 0.02 <= clean <= 0.09
    assert flagged >= 0.5 and flagged > 5 * clean
    assert defense("squeeze").detector(small_model, mnist.train.x[:100]) is None


# --- BReLU + Gaussian data augmentation -------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_brelu_clips_at_t_with_matching_gradient(t: float) -> None:
    act = defense("brelu", t=t).activation()()
    x = torch.tensor([-2.0, -0.1, 0.3, 0.9 * t, 1.1 * t, 3.0 * t], requires_grad=True)
    y = act(x)
    assert torch.equal(y, torch.minimum(torch.relu(x), torch.tensor(t)))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    model = defense("brelu", t=t).build()
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.Hardtanh) and m.max_val == t for m in model.modules()) == 3


def test_gaussian_augmentation_doubles_batch_with_noise_of_sigma(mnist: data_mod.Data) -> None:
    brelu = defense("brelu", sigma=0.05)
    x, y = torch.full((256, 1, 28, 28), 0.5), torch.arange(256) % 10
    torch.manual_seed(0)
    xb, yb = brelu.training_batch(nn.Identity(), x, y)
    assert xb.shape == (512, 1, 28, 28) and torch.equal(xb[:256], x) and torch.equal(yb, torch.cat([y, y]))
    noise = xb[256:] - x
    assert abs(noise.mean().item()) < 0.002 and abs(noise.std().item() - 0.05) < 0.002
    torch.manual_seed(0)
    assert torch.equal(brelu.training_batch(nn.Identity(), x, y)[0], xb)
    real, _ = defense("brelu").training_batch(nn.Identity(), mnist.test.x[:64], mnist.test.y[:64])
    assert real.min() >= 0 and real.max() <= 1 and (real[64:] - mnist.test.x[:64]).abs().amax() > 0.5


# --- quantized activations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
@pytest.mark.parametrize("training", [False, True])
def test_activations_take_only_the_levels(bits: int, mode: str, training: bool, mnist: data_mod.Data) -> None:
    torch.manual_seed(0)
    model = defense("dqa", bits=bits, mode=mode).build().train(training)
    outputs: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, QuantizedActivation):
            module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    model(mnist.test.x[:32] * 4)  # scaled so that every level is reached at the first layer
    levels = torch.arange(2 ** bits) / (2 ** bits - 1)
    assert len(outputs) == 3
    for out in outputs:
        assert torch.isin(out.unique(), levels).all()
    assert len(outputs[0].unique()) == 2 ** bits


def test_ste_gradient_in_training_zero_in_eval_and_bpda_uses_ste(mnist: data_mod.Data) -> None:
    torch.manual_seed(0)
    model = defense("dqa").build()
    x, y = mnist.test.x[:16], mnist.test.y[:16]

    def input_grad(m: nn.Module) -> torch.Tensor:
        leaf = x.clone().requires_grad_(True)
        nn.functional.cross_entropy(m(leaf), y).backward()
        return leaf.grad

    trained = input_grad(model.train())
    assert torch.count_nonzero(trained) > 0
    assert all(m.thresholds.grad is not None and m.thresholds.grad.abs().sum() > 0
               for m in model.modules() if isinstance(m, QuantizedActivation))
    assert torch.count_nonzero(input_grad(model.eval())) == 0
    bpda = input_grad(bpda_model(model.eval(), "identity"))
    assert torch.allclose(bpda, trained, atol=1e-7)


def test_dynamic_threshold_gradient_is_minus_the_upstream_over_each_level_interval() -> None:
    """The STE of the docstring: dy/dt_k = −1 where x lies in the k-th level interval, 0 outside [0, 1]."""
    torch.manual_seed(0)
    layer = QuantizedActivation(2, dynamic=True).train()
    x = torch.rand(4, 8, 9, 9) * 1.4 - 0.2
    upstream = torch.randn(x.shape)
    (layer(x) * upstream).sum().backward()
    interval = (x.clamp(0, 1) * 3).floor().clamp(max=2)
    inside = (x >= 0) & (x <= 1)
    expected = torch.stack([-(upstream * ((interval == k) & inside)).sum() for k in range(3)])
    assert torch.allclose(layer.thresholds.grad, expected, atol=1e-4)


def test_dynamic_thresholds_learn_and_stay_ordered(mnist: data_mod.Data) -> None:
    dqa = defense("dqa", bits=2, adv_train="none")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = dqa.build()
        start = [m.thresholds.detach().clone() for m in model.modules() if isinstance(m, QuantizedActivation)]
        fit(model, mnist.train.x, mnist.train.y, TrainConfig(epochs=1, batch_size=32, train_limit=320), seed=0,
            step_hook=dqa.after_step)
    end = [m.thresholds.detach() for m in model.modules() if isinstance(m, QuantizedActivation)]
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(start, end))
    for t in end:
        assert torch.equal(t, t.sort().values) and t.min() >= 0 and t.max() <= 1
    fixed = [m for m in defense("dqa", mode="fixed").build().modules() if isinstance(m, QuantizedActivation)]
    assert fixed and not any(isinstance(m.thresholds, nn.Parameter) for m in fixed)


# --- PGD adversarial training ---------------------------------------------------------------------------------------
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def test_advtrain_batch_in_eps_ball_and_raises_loss(mnist: data_mod.Data, small_model: nn.Module) -> None:
    x, y = mnist.test.x[:64], mnist.test.y[:64]
    model = small_model.train()
    torch.manual_seed(0)
    adv, y_adv = defense("advtrain").training_batch(model, x, y)
    assert model.training and torch.equal(y_adv, y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    noise = (x + torch.empty_like(x).uniform_(-0.3, 0.3)).clamp(0, 1)
    assert _loss(model, adv, y) > max(_loss(model, x, y), _loss(model, noise, y)) + 1.0
    small_model.eval()


def test_dqa_pgd_batch_follows_the_ste(mnist: data_mod.Data) -> None:
    """PGD examples for DQA training are crafted in training mode, through the STE: on a small quickly trained
    quantized-activation MLP they raise the loss far above uniform noise of the same size; crafted on the eval-mode
    model (zero gradient) they could not."""
    dqa = defense("dqa")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), QuantizedActivation(2, dynamic=True),
                              nn.Linear(128, 10))
        fit(model, mnist.train.x, mnist.train.y, TrainConfig(epochs=2, train_limit=5000), seed=0,
            step_hook=dqa.after_step)
        x, y = mnist.test.x[:64], mnist.test.y[:64]
        adv, y_adv = dqa.training_batch(model.train(), x, y)
        noise = (x + torch.empty_like(x).uniform_(-0.3, 0.3)).clamp(0, 1)
    assert model.training and torch.equal(y_adv, y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _loss(model, adv, y) > max(_loss(model, x, y), _loss(model, noise, y)) + 1.0
    masked = torchattacks.PGD(model.eval(), eps=0.3, alpha=0.01, steps=40)(x, y)
    assert _loss(model, masked, y) < _loss(model, adv, y) - 1.0
    assert defense("dqa", adv_train="none").training_batch(model, x, y)[0] is x
