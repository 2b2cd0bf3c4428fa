"""QuSecNets CQ/TQ: eq. 1 values, hard mode, the threshold gradient (eqs. 5–8), TQ training on real MNIST, the
model cache, BPDA, ``bench list`` and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from matplotlib.figure import Figure

from bench import data as data_mod
from bench.bpda import BPDA, bpda_model
from bench.cli import main
from bench.plots import dataset_title
from bench.threats.quantized import QuantizedSpace
from bench.train import ModelCache, TrainConfig, fit
from bench.types import Dataset
from conftest import DATA
from defenses import REGISTRY
from defenses.cq import QuantizationLayer, constant_thresholds

DATA_DIR = str(DATA)


def defense(name: str, dataset: Dataset = Dataset.MNIST, **given: object):
    cls = REGISTRY.get(name)
    return cls(dataset, cls.resolve(given, dataset))


def test_ids_and_defaults() -> None:
    assert defense("cq").id == "cq(n=2,z=50)"
    assert defense("tq", levels=4).id == "tq(n=4,z=5)"
    assert defense("cq", thresholds="uniform", hard=True).id == "cq(n=2,z=50,thresholds=uniform,hard=true)"
    assert defense("tq").training_overrides() == {"loss": "mse"}
    assert defense("tq", loss="ce").training_overrides() == {"loss": "ce"}


def test_eq1_two_levels() -> None:
    layer = defense("cq").preprocess()
    out = layer(torch.tensor([0.2, 0.5, 0.8]).view(1, 1, 1, 3)).flatten()
    assert out[0] < 1e-6 and abs(out[1] - 0.5) < 1e-6 and out[2] > 1 - 1e-6


def test_eq1_four_levels_far_from_thresholds() -> None:
    layer = defense("cq", levels=4).preprocess()
    x = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 0.05, 0.3, 0.7, 0.95]).view(1, 1, 2, 4)
    out = layer(x).flatten()
    expected = torch.tensor([0, 1 / 3, 2 / 3, 1, 0, 1 / 3, 2 / 3, 1])
    assert torch.allclose(out, expected, atol=1e-3)


def test_threshold_kinds() -> None:
    assert torch.allclose(constant_thresholds(4), torch.tensor([1 / 6, 1 / 2, 5 / 6]))
    assert torch.allclose(constant_thresholds(4, "uniform"), torch.tensor([0.25, 0.5, 0.75]))
    assert torch.equal(constant_thresholds(2), torch.tensor([0.5])) and torch.equal(constant_thresholds(2, "uniform"),
                                                                                     torch.tensor([0.5]))
    uniform = defense("cq", levels=4, thresholds="uniform").preprocess()
    assert torch.allclose(uniform.thresholds, torch.tensor([0.25, 0.5, 0.75]))
    x = torch.full((1, 1, 1, 1), 0.2)
    assert uniform(x).item() < 0.05 and defense("cq", levels=4).preprocess()(x).item() > 0.25


@pytest.mark.parametrize("name", ["cq", "tq"])
def test_hard_mode_outputs_exact_levels_with_zero_gradient(name: str) -> None:
    layer = defense(name, levels=4, hard=True).preprocess().eval()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = layer(x)
    assert torch.isin(out, torch.arange(4.0) / 3).all()
    assert torch.equal(out, (x.detach().unsqueeze(-1) > layer.thresholds).float().mean(-1))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))
    assert not torch.equal(layer.train()(x), out)


def _learned(name: str, levels: int) -> torch.nn.Module:
    """The layer of ``name`` with, for TQ, per-pixel thresholds spread as training leaves them."""
    layer = defense(name, levels=levels).preprocess().eval()
    if name == "tq":
        with torch.no_grad():
            layer.thresholds.uniform_(0.1, 0.9).copy_(layer.thresholds.sort(-1).values)
    return layer


@pytest.mark.parametrize(("name", "levels"), [("cq", 2), ("cq", 5), ("tq", 4)])
def test_inverse_maps_quantized_values_back_into_the_interval(name: str, levels: int) -> None:
    layer = _learned(name, levels)
    generator = torch.Generator().manual_seed(6)
    lo = torch.rand(8, 1, 28, 28, generator=generator) * 0.8
    hi = lo + 0.2
    v = layer(lo + (hi - lo) * torch.rand(lo.shape, generator=generator))
    x = layer.inverse(v, lo, hi)
    assert (x >= lo).all() and (x <= hi).all()
    assert (layer(x) - v).abs().max() < 1e-5


@pytest.mark.parametrize(("name", "levels"), [("cq", 2), ("tq", 4)])
def test_quantized_space_reaches_the_box_and_decodes_to_what_the_classifier_saw(name: str, levels: int) -> None:
    """The iterate x0 stands for Q(x0), the ball's ends for Q at the ends; any iterate decodes to pixels in the
    ball whose quantization is the classifier input it stood for; a pixel at 0 or 1 gets a gradient at x0."""
    layer, eps = _learned(name, levels), 0.6
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(8, 1, 28, 28, generator=generator)
    image[:, :, :5] = 0.0
    image[:, :, -5:] = 1.0
    space = QuantizedSpace(layer, eps)
    lo, hi = (image - eps).clamp(0, 1), (image + eps).clamp(0, 1)
    assert torch.equal(space(image, image), layer(image))
    assert torch.allclose(space(lo, image), layer(lo), atol=1e-6) and torch.allclose(space(hi, image), layer(hi), atol=1e-6)
    x = lo + (hi - lo) * torch.rand(image.shape, generator=generator)
    pixels = space.decode(x, image)
    assert ((pixels - image).abs() <= eps + 1e-6).all() and pixels.min() >= 0 and pixels.max() <= 1
    assert (layer(pixels) - space(x, image)).abs().max() < 1e-5
    start = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(space(start, image).sum(), start)
    moves = layer(hi) - layer(lo) > 1e-3
    assert (grad[moves] > 0).all() and moves[:, :, :5].any() and moves[:, :, -5:].any()


def test_threshold_gradient_matches_closed_form() -> None:
    generator = torch.Generator().manual_seed(1)
    n, z = 5, 5.0
    start = torch.rand(3, 4, 4, n - 1, generator=generator).sort(-1).values
    layer = QuantizationLayer(start, z, trainable=True)
    x = torch.rand(6, 3, 4, 4, generator=generator)
    upstream = torch.randn(6, 3, 4, 4, generator=generator)
    (layer(x) * upstream).sum().backward()
    s = torch.sigmoid(z * (x.unsqueeze(-1) - start))
    closed = (-z / (n - 1) * s * (1 - s) * upstream.unsqueeze(-1)).sum(0)
    assert torch.allclose(layer.thresholds.grad, closed, atol=1e-6)


def test_tq_thresholds_learn_and_stay_ordered_in_unit_interval() -> None:
    tq = defense("tq", levels=4)
    model = tq.build()
    start = model.preprocess.thresholds.detach().clone()
    train = data_mod.load(Dataset.MNIST, DATA_DIR).train
    cfg = TrainConfig(epochs=1, train_limit=2000).with_overrides(tq.training_overrides())
    torch.manual_seed(0)
    fit(model, train.x, train.y, cfg, seed=0, batch_hook=tq.training_batch, step_hook=tq.after_step)
    learned = model.preprocess.thresholds.detach()
    assert (learned - start).abs().max() > 1e-3
    assert learned.min() >= 0 and learned.max() <= 1
    assert (learned.diff(dim=-1) >= 0).all()


def test_tq_state_dict_round_trip_through_model_cache(tmp_path: Path) -> None:
    tq = defense("tq", levels=3)
    cache = ModelCache(tmp_path)
    fields = {"kind": "classifier", "weights": tq.weights_key()}
    learned = torch.rand(1, 28, 28, 2, generator=torch.Generator().manual_seed(2)).sort(-1).values

    def train(model: torch.nn.Module) -> dict[str, object]:
        with torch.no_grad():
            model.preprocess.thresholds.copy_(learned)
        return {}

    def must_not_train(model: torch.nn.Module) -> dict[str, object]:
        raise AssertionError("the cached model should have been loaded")

    cache.get_or_train("mnist", tq.id, fields, tq.build, train)
    loaded, facts = cache.get_or_train("mnist", tq.id, fields, tq.build, must_not_train)
    assert facts["cached"] is True
    assert torch.equal(loaded.preprocess.thresholds, learned)


@pytest.mark.parametrize("name", ["cq", "tq"])
def test_bpda_forward_exact_and_backward_approximations(name: str) -> None:
    model = defense(name, levels=3).build().eval()
    if name == "tq":
        with torch.no_grad():
            model.preprocess.thresholds.uniform_(0.2, 0.8).copy_(model.preprocess.thresholds.sort(-1).values)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for backward in ("identity", "soft"):
        wrapped = bpda_model(model, backward, 1.0)
        assert isinstance(wrapped.preprocess, BPDA)
        assert torch.equal(wrapped(x), model(x))
    upstream = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    layer = model.preprocess
    leaf = x.clone().requires_grad_(True)
    BPDA(layer, layer.bpda_approx("identity", 1.0))(leaf).backward(upstream)
    assert torch.equal(leaf.grad, upstream)
    leaf = x.clone().requires_grad_(True)
    BPDA(layer, layer.bpda_approx("soft", 1.0))(leaf).backward(upstream)
    ref = x.clone().requires_grad_(True)
    (torch.sigmoid(ref.unsqueeze(-1) - layer.thresholds.detach()).mean(-1) * upstream).sum().backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-7)


def test_bpda_soft_gives_gradient_through_hard_quantizer() -> None:
    model = defense("cq", levels=2, hard=True).build().eval()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x).sum(), x)
    (soft,) = torch.autograd.grad(bpda_model(model, "soft", 1.0)(x).sum(), x)
    assert torch.equal(plain, torch.zeros_like(x)) and soft.abs().sum() > 0


def test_bench_list_shows_cq_and_tq(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    cq = out[out.index("  cq:"):].split("\n\n")[0]
    tq = out[out.index("  tq:"):].split("\n\n")[0]
    for param in ("levels", "z", "thresholds", "hard"):
        assert f"    {param} " in cq
    for param in ("levels", "z", "loss", "hard"):
        assert f"    {param} " in tq
    assert "bpda backward: identity/soft" in cq and "bpda backward: identity/soft" in tq


def test_tiny_suite_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    titles: list[str] = []
    draw = REGISTRY.get("tq").plots
    monkeypatch.setattr(REGISTRY.get("tq"), "plots", lambda self, model, out, title: titles.append(title) or draw(
        self, model, out, title))
    suite = tmp_path / "tiny.toml"
    suite.write_text('name = "tiny"\n[datasets.mnist]\nn = 100\nepochs = 1\ntrain_limit = 2000\n'
                     '[[defenses]]\nname = "cq"\nlevels = [2, 4]\n[[defenses]]\nname = "tq"\nlevels = 2\n'
                     '[[attacks]]\nname = "fgsm"\neps = 0.3\nthreat = ["whitebox", "bpda"]\n')
    out = tmp_path / "out"
    code = main(["run", str(suite), "--out", str(out), "--data-dir", DATA_DIR, "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    cells = {(r["defense"], r["threat_label"]) for r in records}
    assert cells == {(d, t) for d in ("cq(n=2,z=50)", "cq(n=4,z=50)", "tq(n=2,z=5)") for t in ("wb", "bpda")}
    assert all(r["error"] is None and 0 <= r["robust_acc"] <= 1 for r in records)
    assert (out / "plots" / "tq-thresholds-mnist-tq_n=2,z=5_.png").is_file()
    assert titles == [dataset_title("mnist", records[0]["data_official"])]


def test_threshold_figure_title_carries_the_dataset_title(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The learned-threshold figure names the dataset as the runner passes it, so an unofficial copy is marked."""
    tq = REGISTRY.get("tq")
    defense = tq(Dataset.CIFAR10, tq.resolve({}, Dataset.CIFAR10))
    saved: list[str] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.append(fig.get_suptitle()))
    title = dataset_title("cifar10", official=False)
    paths = defense.plots(torch.nn.Sequential(defense.preprocess()), tmp_path, title)
    assert [p.name for p in paths] == ["tq-thresholds-cifar10-tq_n=2,z=5_.png"]
    assert saved == [f"tq(n=2,z=5) learned thresholds (pixel scale [0, 1]), {title}"]
    assert "NOT the official release" in title


def test_hard_variant_shares_the_trained_weights_of_the_soft_one() -> None:
    soft = REGISTRY.get("cq")(Dataset.MNIST, REGISTRY.get("cq").resolve({}, Dataset.MNIST))
    hard = REGISTRY.get("cq")(Dataset.MNIST, REGISTRY.get("cq").resolve({"hard": True}, Dataset.MNIST))
    assert hard.id != soft.id
    assert hard.weights_key() == soft.weights_key() and hard.weights_label() == soft.weights_label()


def test_quantized_threat_beats_masked_gradients_on_real_mnist(tmp_path: Path, cache_dir: Path) -> None:
    """CQ (z = 50) masks white-box gradients; PGD in the quantized space does not need them (quick suite's model:
    white-box 88 %, quantized space 83 % at eps 0.3). Its examples are decoded to pixels within eps and scored by
    the harness on the defended model; the undefended model gets no cell of the threat."""
    suite = tmp_path / "qs.toml"
    suite.write_text('name = "qs"\nseed = 0\n[datasets.mnist]\nn = 200\nepochs = 1\nlr_schedule = "onecycle"\n'
                     'lr = 0.004\n[[defenses]]\nname = "cq"\n[[defenses]]\nname = "none"\n[[attacks]]\nname = "pgd"\n'
                     'eps = 0.3\nstep_size = 40\nstep_schedule = "linear"\nthreat = ["whitebox", "quantized"]\n'
                     '[checks]\nconvergence = false\n')
    out = tmp_path / "out"
    code = main(["run", str(suite), "--out", str(out), "--data-dir", DATA_DIR, "--cache-dir", str(cache_dir),
                 "--device", "cpu", "--no-progress"])
    assert code == 0
    records = {(r["defense"], r["threat_label"]): r for r in map(json.loads, (out / "cells.jsonl").open())}
    assert set(records) == {("cq(n=2,z=50)", "wb"), ("cq(n=2,z=50)", "qs"), ("none", "wb")}
    white, quantized = records["cq(n=2,z=50)", "wb"], records["cq(n=2,z=50)", "qs"]
    assert quantized["error"] is None and quantized["linf"] <= 0.3 + 1e-6
    assert quantized["robust_acc"] <= white["robust_acc"] - 0.03
