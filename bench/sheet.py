"""The adversarial-example sheet of a run (the paper's Fig. 7), drawn by ``bench run`` because it needs the
trained models: a few evaluated test images per dataset, and per defense the clean image, the adversarial
image (white-box, the suite's first L∞ gradient attack at its headline eps) and what the defense's
preprocessing makes of it; clean and adversarial panels are captioned with the defended model's prediction and
probability."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from bench.attacks import REGISTRY as ATTACKS
from bench.evaluate import Context, project
from bench.grid import Cell
from bench.plots import example_sheet
from bench.types import Threat

IMAGES = 4


def _caption(model: torch.nn.Module, x: torch.Tensor, kind: str) -> list[str]:
    with torch.inference_mode():
        probs = model(x.to(next(model.parameters()).device)).softmax(1).cpu()
    return [f"{kind}: {int(p.argmax())} ({100 * float(p.max()):.0f}%)" for p in probs]


def write(cells: list[Cell], ctx: Context, out: Path) -> list[Path]:
    """One sheet per dataset into ``out``; datasets without an L∞ gradient attack get none."""
    written = []
    for dataset in dict.fromkeys(c.dataset for c in cells):
        candidates = [c for c in cells if c.dataset is dataset and c.threat is Threat.WHITEBOX and c.eps is not None
                      and c.eps < 1.0 and ATTACKS.get(c.attack).gradient
                      and ATTACKS.get(c.attack).bound_norm() == "linf" and not c.targeted and c.purpose == "grid"]
        if not candidates:
            continue
        attack_name = candidates[0].attack
        eps = max(c.eps for c in candidates if c.attack == attack_name)
        rows, labels = [], []
        for cell in dict((c.defense_id, c) for c in candidates if c.attack == attack_name).values():
            cell = replace(cell, n=IMAGES, eps=eps)
            try:
                model = ctx.model(cell)
                x_adv, rep, _, _ = ctx.craft(cell, model, cell.cell_seed)
            except Exception as exc:  # noqa: BLE001 - failed defenses already have error cells; draw the others
                warnings.warn(f"{cell.defense_id} left out of the example sheet: {type(exc).__name__}: {exc}",
                              stacklevel=2)
                continue
            _, x, _ = ctx.eval_set(cell)
            x_adv = project(x_adv, x[rep], eps, "linf")
            preprocess = getattr(model, "preprocess", torch.nn.Identity())
            with torch.inference_mode():
                seen = preprocess(x_adv.to(next(model.parameters()).device)).cpu()
            panels = [x, x_adv, seen]
            pairs = zip(_caption(model, x, "clean"), _caption(model, x_adv, "adv"), strict=True)
            rows.append((cell.defense_id, panels))
            labels.append([text for clean, adv in pairs for text in (clean, adv, "after defense")])
        if not rows:
            continue
        title = (f"{dataset.value}: clean / adversarial ({attack_name}, white-box, ε = {eps:g}) / after the "
                 f"defense's preprocessing — prediction of the defended model (probability)")
        written.append(example_sheet(rows, labels, title, out / f"{dataset.value}-adversarial-examples.png"))
    return written
