"""The reproduction report: verdicts are computed from the cells, not written by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.results import pack_mask
from bench.runner import plan
from bench.suite import load_suite
from conftest import ROOT, bench
from test_leaderboard import N, cell


def qcell(defense: str, attack: str, threat: str, eps: float | None, survivors: int, **extra: Any) -> dict[str, Any]:
    name = defense.split("(")[0]
    levels = int(defense.split("n=")[1].split(",")[0]) if "n=" in defense else None
    record = cell(defense, attack, threat, eps, list(range(survivors)), **extra)
    record.update(defense_name=name, defense_params={"levels": levels, "z": 50} if levels else {})
    return record


def claim(text: str) -> report.Claim:
    return next(c for c in report.CLAIMS if c.text.startswith(text))


def test_cq_claim_reproduced_only_without_adaptive_attacks() -> None:
    records = [qcell("cq(n=2,z=50)", "fgsm", "whitebox", 0.3, N), qcell("cq(n=2,z=50)", "pgd", "bpda", 0.3, 0)]
    c = claim("MNIST, white-box FGSM ε 0.3, CQ")
    assert report.verdict(c, c.figures(records)) == "reproduced only without adaptive attacks"
    records[1] = qcell("cq(n=2,z=50)", "pgd", "bpda", 0.3, N)
    assert report.verdict(c, c.figures(records)) == "reproduced"
    records[0] = qcell("cq(n=2,z=50)", "fgsm", "whitebox", 0.3, N // 2)
    assert report.verdict(c, c.figures(records)) == "not reproduced"
    records.append(qcell("cq(n=2,z=50)", "fgsm", "oblivious", 0.3, N))
    assert report.verdict(c, c.figures(records)) == "reproduced only against an oblivious attacker"
    assert report.verdict(c, c.figures([])) == "not evaluated"


def test_summary_and_cifar_marks_are_generated() -> None:
    records = [qcell("cq(n=2,z=50)", "fgsm", "whitebox", 0.3, N), qcell("cq(n=2,z=50)", "pgd", "bpda", 0.3, 0),
               qcell("cq(n=2,z=50)", "fgsm", "oblivious", 0.3, N)]
    text = report.render(records)
    assert "1 reproduced only without adaptive attacks" in text and "Reproduced only without adaptive attacks: #2." \
        in text
    assert "CQ (n = 2) at 97.51 % under FGSM ε 0.3 on MNIST, measures here: oblivious 100.0 %, white-box 100.0 %" \
        in text and "adaptive worst case 0.0 %" in text
    assert "not the official release" in text


def test_the_report_names_the_budgets_where_autoattack_has_not_run() -> None:
    records = [qcell("cq(n=2,z=50)", "pgd", "bpda", 0.1, N), qcell("cq(n=2,z=50)", "pgd", "bpda", 0.3, 2),
               qcell("none", "pgd", "whitebox", 0.1, 3), qcell("none", "autoattack", "whitebox", 0.1, 2)]
    text = report.render(records)
    assert "- **mnist: no AutoAttack yet** at ε 0.1 on cq(n=2,z=50); at ε 0.3 on cq(n=2,z=50):" in text
    records.append(qcell("cq(n=2,z=50)", "autoattack", "bpda", 0.3, 0))
    assert "at ε 0.1 on cq(n=2,z=50):" in report.render(records)
    records.append(qcell("cq(n=2,z=50)", "autoattack", "bpda", 0.1, 1))
    assert "no AutoAttack yet" not in report.render(records)


def test_level_trend_and_report_rendering() -> None:
    records = [qcell(f"cq(n={n},z=50)", "fgsm", "whitebox", 0.3, N - n) for n in (2, 3, 4)]
    c = claim("More quantization levels")
    assert c.figures(records).whitebox == 1.0 and report.verdict(c, c.figures(records)) == "reproduced"
    records = [qcell(f"cq(n={n},z=50)", "fgsm", "whitebox", 0.3, n) for n in (2, 3, 4)]
    assert c.figures(records).whitebox == 0.0 and report.verdict(c, c.figures(records)) == "not reproduced"
    text = report.render(records)
    assert "| 11 | More quantization levels lower robust accuracy |" in text and "**not reproduced**" in text


def test_a_partial_or_missing_grid_is_said_on_top_of_the_report(tmp_path: Path,
                                                                 bench_env: dict[str, str]) -> None:
    """Two of three planned cells stored, a second directory without cells: the report says so, exit 0."""
    lines = (ROOT / "results" / "paper-mnist" / "cells.jsonl").read_text().splitlines(keepends=True)[:2]
    out = tmp_path / "paper-mnist"
    out.mkdir()
    (out / "cells.jsonl").write_text("".join(lines))
    (out / "plan.json").write_text(json.dumps({"cells": [json.loads(line)["cell_id"] for line in lines] + ["x"]}))
    result = bench("report", str(out), str(tmp_path / "paper-cifar10"), "--out", str(tmp_path / "R.md"),
                   env=bench_env)
    assert result.returncode == 0, result.stderr
    assert "paper-cifar10/cells.jsonl does not exist" in result.stderr
    text = (tmp_path / "R.md").read_text()
    assert f"**{out}: partial, 2 of 3 cells**" in text and f"**{tmp_path / 'paper-cifar10'}: not run**" in text
    unknown = "- b: 5 cells (the size of its grid is unknown: no plan.json)"
    assert report.coverage({"a": (3, 3), "b": (5, None)}) == ["- a: complete, 3 cells", unknown]
    nothing = bench("report", str(tmp_path / "none"), "--out", str(tmp_path / "R2.md"), env=bench_env)
    assert nothing.returncode == 2 and "bench: error: no results in" in nothing.stderr


@pytest.mark.slow
def test_paper_mnist_limit_200_report_follows_its_cells(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """The paper-mnist grid on its first 200 test images, end to end (hours on 2 CPU cores, most of it training:
    run with ``pytest -m slow`` where models are cached or a GPU is present). The report's verdicts come from the
    stored cells: breaking the CQ n=2 BPDA cells changes the FGSM 0.3 claim's verdict."""
    out = tmp_path / "paper-mnist"
    result = bench("run", "suites/paper-mnist.toml", "--limit", "200", "--out", str(out), env=bench_env,
                   timeout=6 * 3600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    assert len(records) == len(plan(load_suite("suites/paper-mnist.toml"), 200))
    assert all(r["n"] == 200 and r["error"] is None for r in records)
    assert bench("report", str(out), "--out", str(tmp_path / "REPRODUCTION.md"), env=bench_env).returncode == 0
    text = (tmp_path / "REPRODUCTION.md").read_text()
    assert "not evaluated" in text  # the CIFAR-10 claims: no CIFAR-10 cells were given
    c = claim("MNIST, white-box FGSM ε 0.3, CQ")
    fooled = [{**r, "robust_acc": 0.0, "robust_mask": pack_mask([False] * r["n"])} if r["threat"] == "bpda" else r
              for r in records]
    assert report.verdict(c, c.figures(fooled)) in ("reproduced only without adaptive attacks", "not reproduced")
    survived = [{**r, "robust_acc": r["clean_acc"], "robust_mask": r["clean_mask"]} for r in records]
    assert report.verdict(c, c.figures(survived)) == "reproduced"


def test_jsma_claim_adaptive_figure_is_the_per_image_worst_case_of_its_jsma_cells() -> None:
    """JSMA is an L0 attack: the adaptive figure of "JSMA is not countered" combines the defense's JSMA cells per
    image (here white-box keeps images 0-2, BPDA images 2-5: only image 2 survives both) and ignores L∞ cells."""
    c = claim("MNIST: JSMA is not countered")
    wb = qcell("cq(n=2,z=50)", "jsma", "whitebox", None, 3, norm="l0")
    bpda = {**qcell("cq(n=2,z=50)", "jsma", "bpda", None, 0, norm="l0"),
            "robust_mask": pack_mask([i in (2, 3, 4, 5) for i in range(N)]), "robust_acc": 4 / N}
    linf = qcell("cq(n=2,z=50)", "pgd", "bpda", 0.3, N)
    figures = c.figures([wb, bpda, linf])
    assert figures.whitebox == 3 / N and figures.adaptive == 1 / N and "(bpda, wb)" in figures.note
    assert report.verdict(c, figures) == "reproduced"


def test_undefended_cw_claim_shows_the_worst_case_within_the_cw_bound() -> None:
    """C&W-L2 leaves 5 of N images on the undefended CNN, PGD within the same L∞ bound none: the claim (0 %) is
    not reproduced by C&W, and the adaptive column says that a stronger attack within the bound does reach it."""
    records = [qcell("none", "cw_l2", "whitebox", 0.1, 5, attack_params={"target": "none"}),
               qcell("none", "pgd", "whitebox", 0.1, 0), qcell("none", "pgd", "whitebox", 0.3, N)]
    figures = claim("MNIST, C&W-L2, undefended").figures(records)
    assert (figures.whitebox, figures.adaptive) == (5 / N, 0.0) and "within ε 0.1" in figures.note
    assert report.verdict(claim("MNIST, C&W-L2, undefended"), figures) == "not reproduced"
