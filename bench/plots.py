"""Figures of a results directory. The record-based ones (accuracy vs eps, defense bars) are pure functions of
``cells.jsonl``, re-drawn by ``bench leaderboard``; the adversarial-example sheet needs the models and is drawn
by ``bench run``."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

# threat label → (matplotlib line style, its name in the figure title)
THREAT_STYLE: dict[str, tuple[Any, str]] = {
    "wb": ("-", "solid"), "bpda": ("--", "dashed"), "bpda-soft": ((0, (6, 2, 1, 2, 1, 2)), "dash-dot-dot"),
    "qs": ((0, (3, 1, 1, 1)), "dash-dot (dense)"), "bb": ("-.", "dash-dot"), "obl": (":", "dotted"),
}
OTHER_STYLE = ((0, (1, 4)), "sparse dots")  # a plug-in threat's curve
WORST_LABEL = "worst case (every attack)"
WorstCase = Callable[[list[dict[str, Any]], float], float | None]
THREAT_NAME = {"wb": "white-box", "bpda": "BPDA", "bpda-soft": "BPDA (soft)", "qs": "quantized space", "bb": "black-box",
               "obl": "oblivious"}


def _threats(cells: list[dict[str, Any]]) -> list[str]:
    """The threat labels present, the built-in ones first in a fixed order, then any plug-in's."""
    present = dict.fromkeys(r["threat_label"] for r in cells)
    return [t for t in THREAT_STYLE if t in present] + sorted(t for t in present if t not in THREAT_STYLE)


def _grid(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("purpose", "grid") == "grid" and r.get("error") is None]


def _defenses(cells: list[dict[str, Any]], grid: list[dict[str, Any]]) -> list[str]:
    """The defenses of ``cells`` in the order they first appear in the whole ``grid`` (the suite's order for a run
    in one go), so that every figure of a results directory shows them in the same order."""
    present = {r["defense"] for r in cells}
    return [d for d in dict.fromkeys(r["defense"] for r in grid) if d in present]


def dataset_title(dataset: str, official: bool) -> str:
    """The dataset's name in a figure title, marked when its files are not the official release, so that a figure
    copied out of the report still says so."""
    return dataset + ("" if official else " (data: NOT the official release)")


def dataset_label(dataset: str, cells: list[dict[str, Any]]) -> str:
    """:func:`dataset_title` for the records ``cells``: marked when any of them says its data is not official."""
    return dataset_title(dataset, all(r.get("data_official") is not False for r in cells))


def accuracy_vs_eps(records: list[dict[str, Any]], out: Path, worst: WorstCase) -> list[Path]:
    """Per dataset and L∞ attack: robust accuracy against eps, one panel per defense, one line per threat, and in
    black the per-image worst case over every attack run on the defense at that eps (``worst``, the leaderboard's
    rule): the paper's Figs. 5 and 6 with the oblivious and adaptive curves beside the white-box one."""
    grid = _grid(records)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in grid:
        if r["eps"] is not None and r["norm"] == "linf" and r["eps"] < 1.0 and not r["targeted"]:
            groups[(r["dataset"], r["attack"])].append(r)
    written = []
    for (dataset, attack), cells in sorted(groups.items()):
        eps_values = sorted({r["eps"] for r in cells})
        if len(eps_values) < 2:
            continue
        defenses = _defenses(cells, grid)
        threats = _threats(cells)
        colours = dict(zip(threats, plt.get_cmap("tab10")(range(len(threats))), strict=True))
        cols = min(4, len(defenses))
        rows = -(-len(defenses) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows + 0.9), sharex=True, sharey=True,
                                 squeeze=False)
        for ax, defense in zip(axes.flat, defenses, strict=False):
            for threat in threats:
                line = {r["eps"]: r["robust_acc"] for r in cells if r["defense"] == defense
                        and r["threat_label"] == threat}
                if line:
                    ax.plot(eps_values, _percent([line.get(e) for e in eps_values]), color=colours[threat],
                            linestyle=THREAT_STYLE.get(threat, OTHER_STYLE)[0], marker="o", markersize=3,
                            linewidth=3 if threat == "wb" else 1.5,  # visible under an equal BPDA line
                            label=THREAT_NAME.get(threat, threat))
            mine = [r for r in grid if r["dataset"] == dataset and r["defense"] == defense]
            ax.plot(eps_values, _percent([worst(mine, e) for e in eps_values]), color="black", linewidth=2,
                    label=WORST_LABEL)
            ax.set_title(_wrap(defense, 48), fontsize=7)
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        for ax in axes.flat[len(defenses):]:
            ax.set_visible(False)
        for column in axes.T:  # the lowest panel of each column carries the eps axis
            lowest = [ax for ax in column if ax.get_visible()][-1]
            lowest.set_xlabel("ε (L∞, pixel scale [0, 1])", fontsize=7)
            lowest.tick_params(labelbottom=True)
        for ax in axes[:, 0]:
            ax.set_ylabel("accuracy under attack (%)", fontsize=7)
        handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
        handles[WORST_LABEL] = handles.pop(WORST_LABEL)  # the threats' lines first, whichever panel drew them
        fig.suptitle(f"{dataset_label(dataset, cells)}: {attack} — one panel per defense", fontsize=9)
        fig.tight_layout()
        fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=len(handles), fontsize=7,
                   bbox_to_anchor=(0.5, 0.0), frameon=False)  # below the panels, kept by bbox_inches="tight"
        written.append(_save(fig, out / file_name(dataset, attack, "accuracy-vs-eps")))
    return written


def _percent(values: list[float | None]) -> list[float]:
    """Accuracies in %, NaN where a cell is missing: the line breaks there instead of drawing a value no cell has."""
    return [float("nan") if v is None else 100 * v for v in values]


def defense_bars(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Per dataset and attack (at its largest eps below 1): bars per defense, one bar per threat model
    (the paper's Figs. 9-11)."""
    grid = _grid(records)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in grid:
        if r["eps"] is None or r["eps"] < 1.0:
            groups[(r["dataset"], r["attack"])].append(r)
    written = []
    for (dataset, attack), cells in sorted(groups.items()):
        eps = max((r["eps"] for r in cells if r["eps"] is not None), default=None)
        cells = [r for r in cells if r["eps"] == eps]
        defenses = _defenses(cells, grid)
        threats = _threats(cells)
        width = 0.8 / len(threats)
        fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(defenses) + 2), 4.5))
        for i, threat in enumerate(threats):
            values = [next((100 * r["robust_acc"] for r in cells if r["defense"] == d and r["threat_label"] == threat),
                           float("nan")) for d in defenses]
            bars = ax.bar([k + i * width for k in range(len(defenses))], values, width,
                          label=THREAT_NAME.get(threat, threat))
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(defenses))], defenses, rotation=35, ha="right",
                      fontsize=7)
        ax.set_xlabel("defense", fontsize=8)
        ax.set_ylabel("accuracy under attack (%)")
        ax.set_ylim(0, 108)  # room for the value printed above a full bar
        ax.set_yticks(range(0, 101, 20))
        ax.set_title(f"{dataset_label(dataset, cells)}: {attack}" + ("" if eps is None else f" at ε = {eps:g}"))
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, out / file_name(dataset, attack, *([] if eps is None else [f"eps{eps:g}"]), "bars")))
    return written


def example_sheet(rows: list[tuple[str, list[torch.Tensor]]], labels: list[list[str]], title: str,
                  path: Path) -> Path:
    """An adversarial-example sheet (the paper's Fig. 7): one row per defense; for each image three panels
    (clean, adversarial, adversarial after the defense's preprocessing) captioned with prediction and
    probability. ``rows`` holds (defense id, [clean, adversarial, preprocessed] image batches)."""
    images = rows[0][1][0].shape[0]
    fig, axes = plt.subplots(len(rows), 3 * images, figsize=(1.3 * 3 * images, 1.55 * len(rows) + 0.6),
                             squeeze=False)
    for r, ((defense, panels), captions) in enumerate(zip(rows, labels, strict=True)):
        for i in range(images):
            for p, batch in enumerate(panels):
                ax = axes[r][3 * i + p]
                picture = batch[i].permute(1, 2, 0).clamp(0, 1).numpy()
                ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(captions[3 * i + p], fontsize=6)
                if i == 0 and p == 0:
                    ax.set_ylabel(_wrap(defense), fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def _wrap(defense: str, width: int = 18) -> str:
    """A defense id on several lines, broken after its commas, to fit beside one row of small images."""
    lines = [""]
    for part in defense.replace(",", ", ").split(" "):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def file_name(*parts: str, limit: int = 120) -> str:
    """A safe ``.png`` name from untrusted parts (dataset and attack ids come from records): ASCII letters,
    digits and ``-_.=,`` only, so never a path separator; long names cut with a hash of the whole so that they
    stay distinct and fit the file system."""
    name = "-".join("".join(c if c.isascii() and (c.isalnum() or c in "-_.=,") else "_" for c in str(part))
                    for part in parts)
    if len(name) > limit:
        name = f"{name[:limit - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return f"{name}.png"


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")  # keeps a legend placed beside the axes
    plt.close(fig)
    return path


def write(records: list[dict[str, Any]], out: Path, worst: WorstCase) -> list[Path]:
    """All record-based figures of ``records`` into ``out`` (``OUT/plots``); ``worst``: the per-image worst case
    of a defense's cells within an eps (:func:`bench.leaderboard.worst_case`)."""
    return accuracy_vs_eps(records, out, worst) + defense_bars(records, out)
