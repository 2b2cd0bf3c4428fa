"""The reproduction report: verdicts are computed from the cells, not written by hand."""

from __future__ import annotations

from typing import Any

from bench import report
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
    assert report.verdict(c, c.figures([])) == "not evaluated"


def test_level_trend_and_report_rendering() -> None:
    records = [qcell(f"cq(n={n},z=50)", "fgsm", "whitebox", 0.3, N - n) for n in (2, 3, 4)]
    c = claim("More quantization levels")
    assert c.figures(records).whitebox == 1.0 and report.verdict(c, c.figures(records)) == "reproduced"
    records = [qcell(f"cq(n={n},z=50)", "fgsm", "whitebox", 0.3, n) for n in (2, 3, 4)]
    assert c.figures(records).whitebox == 0.0 and report.verdict(c, c.figures(records)) == "not reproduced"
    text = report.render(records)
    assert "| 11 | More quantization levels lower robust accuracy |" in text and "**not reproduced**" in text
