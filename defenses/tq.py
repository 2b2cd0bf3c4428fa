"""Trainable Quantization (TQ) of QuSecNets: per-pixel thresholds learned by back-propagation."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from bench.registry import Param
from defenses.base import REGISTRY, Defense
from defenses.cq import HARD, QuantizationLayer, checked_levels, constant_thresholds, levels_param, steepness_param


@REGISTRY.register
class TrainableQuantization(Defense):
    """Trainable Quantization (TQ): eq. 1 with per-pixel thresholds learned together with the CNN.

    QuSecNets (Khalid, Ali et al. 2019): thresholds of shape C×H×W×(n−1), initialised at the CQ midpoint thresholds,
    z = 5, trained by back-propagation (d y / d t_k = −z/(n−1) · S_k (1 − S_k), eqs. 5–8, which autograd computes)
    with the paper's cost, the squared error between softmax and one-hot label (eq. 2, ``loss = "mse"``). After
    every optimiser step the thresholds are clamped to [0, 1] and sorted. Layer: :mod:`defenses.cq`.
    """

    name = "tq"
    bpda_variants = ("identity", "soft")
    params = (
        levels_param(2),
        steepness_param(5.0),
        Param("loss", str, "mse", "training cost: mse (softmax vs one-hot, paper eq. 2) or ce (cross-entropy)",
              choices=("mse", "ce")),
        HARD,
    )

    def monotone_preprocess(self) -> bool:
        return not self.values["hard"]

    def preprocess(self) -> nn.Module:
        levels = checked_levels(self.values)
        c, h, w = self.dataset.shape
        thresholds = constant_thresholds(levels).expand(c, h, w, levels - 1)
        return QuantizationLayer(thresholds, self.values["z"], trainable=True, hard=self.values["hard"])

    def training_overrides(self) -> dict[str, str]:
        return {"loss": self.values["loss"]}

    def after_step(self, model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, QuantizationLayer):
                module.project_()

    def plots(self, model: nn.Module, out_dir: Path, dataset_title: str) -> list[Path]:
        """One PNG: the learned per-pixel threshold maps, a panel per threshold (rows: channels on CIFAR-10), each
        with its own colour scale, since training moves thresholds by little compared with their spacing."""
        from matplotlib.figure import Figure

        from bench.plots import file_name

        layer = next(m for m in model.modules() if isinstance(m, QuantizationLayer))
        thresholds = layer.thresholds.detach().cpu().numpy()
        channels, count = thresholds.shape[0], thresholds.shape[-1]
        initial = constant_thresholds(count + 1)
        names = ("R", "G", "B") if channels == 3 else ("",) * channels
        fig = Figure(figsize=(3.0 * count + 0.4, 2.6 * channels + 0.6), layout="constrained")
        axes = fig.subplots(channels, count, squeeze=False)
        for c in range(channels):
            for k in range(count):
                ax = axes[c][k]
                image = ax.imshow(thresholds[c, :, :, k], cmap="viridis")
                ax.set_title(f"{names[c]} t{k + 1} (init {initial[k]:.3g})".strip(), fontsize=9)
                ax.set_xticks([])
                ax.set_yticks([])
                fig.colorbar(image, ax=ax, shrink=0.8)
        fig.suptitle(f"{self.id} learned thresholds (pixel scale [0, 1]), {dataset_title}")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / file_name("tq-thresholds", self.dataset.value, self.id)
        fig.savefig(path, dpi=100)
        return [path]
