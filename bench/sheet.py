"""The adversarial-example sheet (the paper's Fig. 7) from stored records.

The cells of the first untargeted L∞ gradient attack under ``whitebox`` at its largest eps below 1 (one per
defense, chosen by :func:`bench.grid.expand`) keep a few evaluated images in their record: the clean image, the
adversarial image, what the defense's preprocessing makes of it, and the defended model's predictions. The sheet
is drawn from those records alone, so it re-renders without models (``bench leaderboard``)."""

from __future__ import annotations

import base64
import binascii
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.plots import dataset_label, example_sheet, file_name

IMAGES = 4


def _encode(x: torch.Tensor) -> dict[str, Any]:
    pixels = (x.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return {"shape": list(pixels.shape), "uint8": base64.b64encode(pixels.tobytes()).decode()}


def _decode(data: dict[str, Any]) -> torch.Tensor:
    pixels = np.frombuffer(base64.b64decode(data["uint8"]), dtype=np.uint8).reshape(data["shape"])
    return torch.from_numpy(pixels.astype(np.float32) / 255)


def capture(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, Any]:
    """The record field ``examples``: images (8-bit), the preprocessed adversarial images and the predictions."""
    device = next(model.parameters()).device
    preprocess = getattr(model, "preprocess", nn.Identity())
    with torch.inference_mode():
        seen = preprocess(x_adv.to(device)).cpu()
        clean_probs = model(x.to(device)).softmax(1).cpu()
        adv_probs = model(x_adv.to(device)).softmax(1).cpu()
    return {"clean": _encode(x), "adv": _encode(x_adv), "seen": _encode(seen),
            "clean_pred": clean_probs.argmax(1).tolist(),
            "clean_prob": [round(float(p), 4) for p in clean_probs.amax(1)],
            "adv_pred": adv_probs.argmax(1).tolist(), "adv_prob": [round(float(p), 4) for p in adv_probs.amax(1)]}


def write(records: Iterable[dict[str, Any]], out: Path) -> list[Path]:
    """One sheet per dataset whose records hold examples, into ``out``."""
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("examples") and r.get("error") is None:
            by_dataset.setdefault(r["dataset"], []).append(r)
    written = []
    for dataset, chosen in by_dataset.items():
        chosen = list({r["defense"]: r for r in chosen}.values())
        rows, labels = [], []
        for r in chosen:
            ex = r["examples"]
            try:
                panels = [_decode(ex["clean"]), _decode(ex["adv"]), _decode(ex["seen"])]
            except (ValueError, TypeError, binascii.Error):
                warnings.warn(f"cell {r['cell_id']}: its stored examples are damaged; left out of the sheet",
                              stacklevel=2)
                continue
            if len({p.shape for p in panels}) != 1 or len(ex["clean_pred"]) != len(panels[0]):
                warnings.warn(f"cell {r['cell_id']}: its stored examples do not match; left out of the sheet",
                              stacklevel=2)
                continue
            rows.append((r["defense"], panels))
            labels.append([text for c, cp, a, ap in zip(ex["clean_pred"], ex["clean_prob"], ex["adv_pred"],
                                                        ex["adv_prob"], strict=True)
                           for text in (f"clean: {c} ({100 * cp:.0f}%)", f"adv: {a} ({100 * ap:.0f}%)",
                                        "after defense")])
        if not rows:
            continue
        first = chosen[0]
        title = (f"{dataset_label(dataset, chosen)}: clean / adversarial ({first['attack']}, white-box, "
                 f"ε = {first['eps']:g}) / after the defense's preprocessing — prediction of the defended model "
                 f"(probability)")
        written.append(example_sheet(rows, labels, title, out / file_name(dataset, "adversarial-examples")))
    return written
