"""Evaluation red flags, computed from stored cells only (never by re-running anything).

These are the automatable checks of Carlini et al. 2019, "On Evaluating Adversarial Robustness" (sec. 5), in the
spirit of AutoAttack's ``checks.py``: warnings with evidence, never a verdict. ``docs/flags.md`` explains each
one and what to do about it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MASKING_MARGIN = 0.05  # any other threat or a gradient-free attack beats plain white-box by more than this
SINGLE_ITER_MARGIN = 0.02  # a single-step attack beats an iterative one by more than this
NOT_CONVERGED_MARGIN = 0.02  # doubling PGD steps lowers accuracy by more than this
NO_ZERO_LEVEL = 0.05  # accuracy an unbounded (eps >= 1) PGD must reach
TRANSFER_MARGIN = 0.02  # black-box beats white-box (same attack, same eps) by more than this
NO_GRAD_LEVEL = 0.01  # input gradient zero or non-finite for more than this fraction of the evaluated images
UNSTABLE_LEVEL = 0.05  # share of the loss gain of surviving images that came in the attack's last 10 % of steps

CODES = ("masking", "single>iter", "not-converged", "no-zero", "transfer>wb", "no-grad", "random", "unstable-loss",
         "mixed-weights", "no-autoattack")


@dataclass(frozen=True)
class Flag:
    dataset: str
    defense: str
    code: str
    evidence: str


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _label(r: dict[str, Any]) -> str:
    eps = "" if r["eps"] is None else f" eps={r['eps']:g}"
    return f"{r['attack']} {r['threat_label']}{eps}"


def _best(cells: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The cell with the lowest robust accuracy (the strongest attack among ``cells``)."""
    return min(cells, key=lambda r: r["robust_acc"], default=None)


def by_defense(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The scored records (error records left out) per (dataset, defense), in first-seen order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("error") is None and r.get("robust_acc") is not None:
            groups[(r["dataset"], r["defense"])].append(r)
    return groups


def compute(records: Iterable[dict[str, Any]]) -> list[Flag]:
    """All red flags of all (dataset, defense) pairs in ``records`` (error records are ignored)."""
    flags = []
    for (dataset, defense), cells in by_defense(records).items():
        for code, evidence in _check(cells):
            flags.append(Flag(dataset, defense, code, evidence))
    return flags


def _grid_by_eps(cells: Iterable[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """The grid cells (no convergence checks) with a budget, per eps."""
    by_eps: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        if r.get("purpose", "grid") == "grid" and r["eps"] is not None:
            by_eps[r["eps"]].append(r)
    return by_eps


def _check(cells: list[dict[str, Any]]) -> Iterable[tuple[str, str]]:
    grid = [r for r in cells if r.get("purpose", "grid") == "grid"]
    by_eps = _grid_by_eps(grid)
    for eps in sorted(by_eps):
        same = by_eps[eps]
        white = _best(r for r in same if r["threat"] == "whitebox" and not r["gradient_free"])
        other = _best(r for r in same if r["threat"] != "whitebox" or r["gradient_free"])
        if white and other and other["robust_acc"] < white["robust_acc"] - MASKING_MARGIN:
            yield "masking", (f"eps={eps:g}: {_label(other)} {_pct(other['robust_acc'])} < strongest plain white-box "
                              f"{_label(white)} {_pct(white['robust_acc'])}")
        for threat in ("whitebox", "bpda"):
            untargeted = [r for r in same if r["threat"] == threat and not r["targeted"] and r["norm"] == "linf"
                          and not r["gradient_free"]]
            single = _best(r for r in untargeted if not r["iterative"])
            iterative = [r for r in untargeted if r["iterative"]]
            weakest_iter = max(iterative, key=lambda r: r["robust_acc"], default=None)
            if single and weakest_iter and single["robust_acc"] < weakest_iter["robust_acc"] - SINGLE_ITER_MARGIN:
                yield "single>iter", (f"eps={eps:g}: {_label(single)} {_pct(single['robust_acc'])} < iterative "
                                      f"{_label(weakest_iter)} {_pct(weakest_iter['robust_acc'])}")
        for bb in (r for r in same if r["threat"] == "blackbox"):
            wb = next((r for r in same if r["threat"] == "whitebox" and r["attack"] == bb["attack"]), None)
            if wb and bb["robust_acc"] < wb["robust_acc"] - TRANSFER_MARGIN:
                yield "transfer>wb", (f"eps={eps:g}: {_label(bb)} {_pct(bb['robust_acc'])} < {_label(wb)} "
                                      f"{_pct(wb['robust_acc'])}")
    for check in (r for r in cells if r.get("purpose") == "convergence"):
        base_params = {**check["attack_params"], "steps": check["attack_params"]["steps"] // 2}
        base = next((r for r in grid if r["attack_name"] == check["attack_name"] and r["attack_params"] == base_params
                     and r["threat_label"] == check["threat_label"] and r["eps"] == check["eps"]), None)
        if base and check["robust_acc"] < base["robust_acc"] - NOT_CONVERGED_MARGIN:
            yield "not-converged", (f"eps={check['eps']:g}: {base['attack']} {base['threat_label']} "
                                    f"{_pct(base['robust_acc'])} → {check['attack']} {_pct(check['robust_acc'])} "
                                    f"with doubled steps")
    gaps = autoattack_gaps(grid)
    if gaps:
        yield "no-autoattack", ("no AutoAttack cell at " + ", ".join(
            f"eps={eps:g} (strongest there: {_label(best)} {_pct(best['robust_acc'])})" for eps, best in gaps)
            + ": the worst case there rests on the suite's other attacks")
    yield from _probes(cells)
    yield from _models(cells)
    unbounded = [r for r in grid if r["attack_name"] == "pgd" and r["eps"] is not None and r["eps"] >= 1.0
                 and r["threat"] in ("whitebox", "bpda")]
    strongest = _best(unbounded)
    if strongest and strongest["robust_acc"] > NO_ZERO_LEVEL:
        yield "no-zero", (f"{_label(strongest)} leaves {_pct(strongest['robust_acc'])} correct at an unbounded "
                          f"budget: the attack, not the defense, is failing")


def autoattack_gaps(cells: Iterable[dict[str, Any]]) -> list[tuple[float, dict[str, Any]]]:
    """For one defense's cells: each L∞ budget below 1 where images stand and no AutoAttack ran, with the strongest
    cell there. The worst case at such a budget rests on the suite's own attacks, and the field's standard check
    could lower it (on paper-mnist it lowered the undefended CNN's worst case at eps 0.1 by 1.7 points)."""
    gaps = []
    for eps, same in sorted(_grid_by_eps(cells).items()):
        best = _best(same)
        if (eps < 1.0 and best and best["robust_acc"] > 0 and any(r["norm"] == "linf" for r in same)
                and not any(r["attack_name"] == "autoattack" for r in same)):
            gaps.append((eps, best))
    return gaps


def _models(cells: list[dict[str, Any]]) -> Iterable[tuple[str, str]]:
    """Cells of one defense computed on differently trained weights (``weights`` digests, or for records of an
    older harness ``model_test_acc``): their per-image worst case mixes models. ``bench run`` recomputes such
    cells; merged or hand-copied records can still carry it."""
    field = "weights" if all(r.get("weights") for r in cells) else "model_test_acc"
    seen: dict[Any, int] = defaultdict(int)
    for r in cells:
        if r.get(field) is not None:
            seen[r[field]] += 1
    if len(seen) > 1:
        counted = ", ".join(f"{k} ({v} cells)" for k, v in sorted(seen.items(), key=lambda kv: -kv[1]))
        yield "mixed-weights", (f"cells computed on {len(seen)} differently trained models ({field} {counted}): the "
                                f"worst case combines them; run the suite again to recompute the cells of other "
                                f"weights than the cached model")


def _probes(cells: list[dict[str, Any]]) -> Iterable[tuple[str, str]]:
    """Flags from what the harness measured on the model and inside the attacks (AutoAttack's checks, Pintor et
    al. 2022's indicators of attack failure)."""
    dead = max((r for r in cells if r.get("grad_zero") is not None), key=lambda r: r["grad_zero"], default=None)
    if dead and dead["grad_zero"] > NO_GRAD_LEVEL:
        straight = any(r.get("bpda_backward") == "identity" for r in cells)
        yield "no-grad", (f"the input gradient through the defended model is zero or non-finite for "
                          f"{_pct(dead['grad_zero'])} of the evaluated images: white-box gradient attacks cannot "
                          f"work; trust bpda and gradient-free attacks"
                          + ("; bpda used the straight-through (identity) backward automatically" if straight else ""))
    if any(r.get("randomized") for r in cells):
        eot = sorted({f"{r['attack']} {r['threat_label']}: EOT over {r['eot']}" for r in cells if r.get("eot")})
        yield "random", ("two forward passes on the same input differ: a randomized defense; gradient attacks need "
                         "Expectation over Transformation, and early stops were off"
                         + (f"; applied: {', '.join(eot)}" if eot else ""))
    unstable = [r for r in cells if r.get("late_loss_gain") is not None and r["late_loss_gain"] > UNSTABLE_LEVEL
                and r["threat"] != "blackbox"]
    worst = max(unstable, key=lambda r: r["late_loss_gain"], default=None)
    if worst:
        yield "unstable-loss", (f"{_label(worst)}: {_pct(worst['late_loss_gain'])} of the loss gain of the images it "
                                f"did not break came in its last 10 % of steps (still rising: more steps or restarts "
                                f"may break more)")
