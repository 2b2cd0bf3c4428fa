"""Leaderboard rendering, per-image worst case and red flags on hand-made cells."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import flags, leaderboard, plots
from bench.errors import BenchError
from bench.results import pack_mask

N = 8


def cell(defense: str, attack: str, threat: str, eps: float | None, correct: list[int], **extra: Any) -> dict[str, Any]:
    mask = [i in correct for i in range(N)]
    return {"suite": "t", "dataset": "mnist", "defense": defense, "attack": attack,
            "attack_name": attack.split("(")[0], "attack_params": extra.pop("attack_params", {}), "threat": threat,
            "threat_label": {"whitebox": "wb", "blackbox": "bb", "bpda": "bpda", "oblivious": "obl"}[threat],
            "eps": eps,
            "norm": extra.pop("norm", "linf"), "targeted": False, "gradient_free": extra.pop("gradient_free", False),
            "iterative": extra.pop("iterative", attack != "fgsm"), "purpose": extra.pop("purpose", "grid"), "n": N,
            "cell_id": f"{defense}-{attack}-{threat}-{eps}-{extra.pop('tag', '')}", "clean_acc": 1.0,
            "robust_acc": sum(mask) / N, "robust_mask": pack_mask(mask),
            "clean_mask": pack_mask(extra.pop("clean", [True] * N)),
            "error": None, "data_provenance": "official release (md5 verified)", "version": "0", "git": "abc",
            **extra}


def test_worst_case_is_per_image_minimum_within_eps() -> None:
    cells = [cell("d", "fgsm", "whitebox", 0.1, [0, 1, 2, 3, 4, 5]),
             cell("d", "pgd", "whitebox", 0.1, [2, 3, 4, 5, 6, 7]),
             cell("d", "pgd", "whitebox", 0.3, [5, 6, 7]),
             cell("d", "cw_l2", "whitebox", None, [0, 5], norm="l2")]
    assert leaderboard.worst_case(cells, 0.1) == 4 / N  # images 2..5 survive both attacks at 0.1
    assert leaderboard.worst_case(cells, 0.3) == 1 / N  # only image 5 survives everything within 0.3
    assert leaderboard.worst_case(cells, None) == 1 / N


def test_table_sorts_by_headline_worst_case_and_renders_markdown() -> None:
    cells = [cell("weak", "fgsm", "whitebox", 0.3, [0]), cell("strong", "fgsm", "whitebox", 0.3, [0, 1, 2, 3]),
             cell("weak", "fgsm", "whitebox", 1.0, []), cell("strong", "fgsm", "whitebox", 1.0, [])]
    head, frame, _ = leaderboard.tables(cells)["mnist"]
    assert frame["defense"].tolist() == head["defense"].tolist() == ["strong", "weak"]
    assert frame.loc[0, "worst 0.3"] == head.loc[0, "worst 0.3"] == 0.5
    assert list(head.columns) == ["defense", "clean", "worst 0.3", "flags"]
    text = leaderboard.render(cells)
    assert "| strong" in text and "fgsm wb 0.3" in text and "worst 0.3" in text and "official release" in text
    assert text.index("### Headline") < text.index("### All cells")


def test_sanity_cells_have_their_own_column_and_enter_no_worst_case() -> None:
    cells = [cell("d", "pgd", "whitebox", 0.3, [0, 1, 2, 3]), cell("d", "pgd(steps=100)", "bpda", 1.0, [])]
    _, frame, _ = leaderboard.tables(cells)["mnist"]
    assert frame.loc[0, "worst"] == frame.loc[0, "worst 0.3"] == 0.5
    assert frame.loc[0, "pgd(steps=100) bpda 1 (sanity)"] == 0.0 and "worst 1" not in frame.columns


def test_worst_case_counts_only_clean_correct_images() -> None:
    cells = [cell("d", "fgsm", "whitebox", 0.3, [0, 1], clean=[True, False] + [True] * 6)]
    cells[0]["robust_mask"] = pack_mask([i == 0 for i in range(N)])
    assert leaderboard.worst_case(cells, 0.3) == 1 / N


def test_a_record_robust_but_not_clean_is_refused() -> None:
    stale = cell("d", "fgsm", "whitebox", 0.3, [0, 1], clean=[True] + [False] * 7)
    with pytest.raises(BenchError, match=f"cell {stale['cell_id']} .*misclassified clean"):
        leaderboard.render([stale])


def test_error_cells_show_as_error() -> None:
    bad = {**cell("d", "pgd", "whitebox", 0.3, []), "robust_acc": None, "error": "RuntimeError: boom"}
    text = leaderboard.render([cell("d", "fgsm", "whitebox", 0.3, [1]), bad])
    assert "| error" in text and "RuntimeError: boom" in text


def codes(cells: list[dict[str, Any]]) -> set[str]:
    return {f.code for f in flags.compute(cells)}


def test_masking_fires_when_bpda_beats_whitebox_and_not_otherwise() -> None:
    white = cell("cq", "pgd", "whitebox", 0.3, list(range(8)))
    assert "masking" in codes([white, cell("cq", "pgd", "bpda", 0.3, [0])])
    assert "masking" not in codes([white, cell("cq", "pgd", "bpda", 0.3, list(range(8)))])
    assert "masking" in codes([white, cell("cq", "square", "whitebox", 0.3, [0], gradient_free=True)])


def test_single_beats_iterative() -> None:
    assert "single>iter" in codes([cell("d", "fgsm", "whitebox", 0.3, [0]), cell("d", "pgd", "whitebox", 0.3, [0, 1, 2])])
    assert "single>iter" not in codes([cell("d", "fgsm", "whitebox", 0.3, [0, 1, 2]),
                                       cell("d", "pgd", "whitebox", 0.3, [0])])


def test_not_converged() -> None:
    base = cell("d", "pgd", "whitebox", 0.3, [0, 1, 2, 3], attack_params={"steps": 10})
    fine = cell("d", "pgd(steps=20)", "whitebox", 0.3, [0, 1, 2, 3], attack_params={"steps": 20},
                purpose="convergence")
    worse = {**fine, "robust_acc": 1 / N, "robust_mask": pack_mask([i == 0 for i in range(N)])}
    assert "not-converged" not in codes([base, fine])
    assert "not-converged" in codes([base, worse])


def test_no_zero() -> None:
    assert "no-zero" in codes([cell("d", "pgd", "whitebox", 1.0, [0, 1])])
    assert "no-zero" not in codes([cell("d", "pgd", "whitebox", 1.0, [0, 1]), cell("d", "pgd", "bpda", 1.0, [])])


def test_transfer_beats_whitebox() -> None:
    assert "transfer>wb" in codes([cell("d", "fgsm", "whitebox", 0.3, [0, 1, 2]), cell("d", "fgsm", "blackbox", 0.3, [])])
    assert "transfer>wb" not in codes([cell("d", "fgsm", "whitebox", 0.3, []),
                                       cell("d", "fgsm", "blackbox", 0.3, [0, 1])])


@pytest.mark.parametrize("code", flags.CODES)
def test_every_flag_is_documented(code: str) -> None:
    from pathlib import Path
    doc = (Path(__file__).resolve().parent.parent / "docs" / "flags.md").read_text()
    assert f"`{code}`" in doc


def test_flags_appear_in_the_leaderboard_with_evidence() -> None:
    text = leaderboard.render([cell("cq", "pgd", "whitebox", 0.3, list(range(8))), cell("cq", "pgd", "bpda", 0.3, [])])
    assert "masking[^mnist-1]" in text and "[^mnist-1]: cq `masking`: eps=0.3: pgd bpda eps=0.3 0.0%" in text


def test_the_header_says_which_devices_and_torch_builds_computed_the_cells() -> None:
    cpu = {"device": "cpu", "torch": "2.13.0+cpu"}
    text = leaderboard.render([cell("d", "fgsm", "whitebox", 0.1, [0], **cpu), cell("d", "pgd", "whitebox", 0.1, [0], **cpu),
                               cell("d", "fgsm", "bpda", 0.1, [0], device="cuda", torch="2.11.0+cu130")])
    assert "- computed on cpu (torch 2.13.0+cpu): 2 cells, cuda (torch 2.11.0+cu130): 1 cells" in text


def test_a_partial_run_says_how_many_cells_are_done(tmp_path: Any) -> None:
    done = cell("d", "fgsm", "whitebox", 0.3, [0, 1])
    (tmp_path / leaderboard.PLAN).write_text('{"suite": "t", "cells": ["%s", "not-yet"]}' % done["cell_id"])
    text = leaderboard.render([done], leaderboard.planned(tmp_path))
    assert "**Partial: 1 of 2 cells.**" in text
    assert "Partial" not in leaderboard.render([done], {done["cell_id"]}) and leaderboard.planned(tmp_path / "x") is None


def test_accuracy_vs_eps_draws_every_threat_and_the_worst_case_per_defense(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """One panel per defense; a line per threat, the oblivious one and a plug-in's included; in black the
    per-image worst case over every attack within each eps (here images 0 and 1 stand under PGD, only image 0
    under the plug-in threat, none under FGSM at 0.3)."""
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    cells = [cell("d", "pgd", threat, eps, [0, 1]) for threat in ("whitebox", "bpda", "oblivious")
             for eps in (0.1, 0.3)]
    cells += [{**cell("d", "pgd", "whitebox", eps, [0]), "threat_label": "mine", "cell_id": f"m{eps}"}
              for eps in (0.1, 0.3)]
    cells += [cell("d", "fgsm", "whitebox", 0.3, []), cell("e", "pgd", "whitebox", 0.1, [0, 1, 2]),
              cell("e", "pgd", "whitebox", 0.3, [0])]
    plots.write(cells, tmp_path, leaderboard.worst_case)
    curves, *_ = drawn
    panel_d, panel_e = (ax for ax in curves.axes if ax.get_visible())
    assert (panel_d.get_title(), panel_e.get_title()) == ("d", "e")
    lines = {line.get_label(): line for line in panel_d.get_lines()}
    assert set(lines) == {"white-box", "BPDA", "oblivious", "mine", plots.WORST_LABEL}
    assert len({lines[t].get_linestyle() for t in ("white-box", "BPDA", "oblivious")}) == 3  # a style per threat
    assert list(lines[plots.WORST_LABEL].get_ydata()) == [100 / N, 0.0]
    worst_e = next(line for line in panel_e.get_lines() if line.get_label() == plots.WORST_LABEL)
    assert list(worst_e.get_ydata()) == [100 * 3 / N, 100 / N]
    bars = drawn[-1]
    assert [t.get_text() for t in bars.axes[0].get_legend().get_texts()] == ["white-box", "BPDA", "oblivious", "mine"]
    assert (bars.axes[0].get_xlabel(), bars.axes[0].get_ylabel()) == ("defense", "accuracy under attack (%)")


def test_a_missing_cell_breaks_its_line_instead_of_drawing_across(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """BPDA has no cell at 0.2 (not run yet): its line has a gap there, not a value interpolated from 0.1 and 0.3."""
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    cells = [cell("d", "pgd", "whitebox", eps, [0, 1]) for eps in (0.1, 0.2, 0.3)]
    cells += [cell("d", "pgd", "bpda", eps, [0]) for eps in (0.1, 0.3)]
    plots.write(cells, tmp_path, leaderboard.worst_case)
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    bpda = list(lines["BPDA"].get_ydata())
    assert bpda[0] == bpda[2] == 100 / N and math.isnan(bpda[1])
    assert list(lines["white-box"].get_ydata()) == [200 / N] * 3


def test_every_figure_orders_the_defenses_as_the_results_directory_does(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """A resumed run appends an attack's cells in the order they were computed (here e's before d's); its panels and
    bars still follow the order in which the defenses first appear in the whole directory (d, e). The legend lists
    the threats' lines, then the worst case, whichever panel drew them first."""
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    cells = [cell(d, "fgsm", "whitebox", eps, [0]) for d in ("d", "e") for eps in (0.1, 0.3)]
    cells += [cell(d, "pgd", threat, eps, [0]) for d, threat in (("e", "whitebox"), ("d", "bpda"))
              for eps in (0.1, 0.3)]
    plots.write(cells, tmp_path, leaderboard.worst_case)
    pgd_curves, pgd_bars = drawn[1], drawn[3]
    assert [ax.get_title() for ax in pgd_curves.axes if ax.get_visible()] == ["d", "e"]
    assert [t.get_text() for t in pgd_curves.legends[0].get_texts()] == ["BPDA", "white-box", plots.WORST_LABEL]
    assert [t.get_text() for t in pgd_bars.axes[0].get_xticklabels()] == ["d", "e"]


def test_figures_of_an_unofficial_dataset_copy_say_so_in_their_title(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The CIFAR-10 copy on the project's machines is not the official release; its figures carry that in the
    title (from the records' ``data_official``), an official copy's do not."""
    drawn: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    for official in (False, True):
        drawn.clear()
        cells = [{**cell("d", "pgd", "whitebox", eps, [0]), "data_official": official} for eps in (0.1, 0.3)]
        plots.write(cells, tmp_path, leaderboard.worst_case)
        curves, bars = drawn
        titles = [curves.get_suptitle(), bars.axes[0].get_title()]
        assert all(("NOT the official release" in t) is not official for t in titles), titles


def test_mixed_weights_fires_when_one_defenses_cells_come_from_two_trainings() -> None:
    def on(weights: str | None, test_acc: float, tag: str) -> dict[str, Any]:
        return cell("cq", "pgd", "whitebox", 0.3, [0, 1], weights=weights, model_test_acc=test_acc, tag=tag)

    assert "mixed-weights" not in codes([on("aa", 0.99, "1"), on("aa", 0.99, "2")])
    assert "mixed-weights" in codes([on("aa", 0.99, "1"), on("bb", 0.99, "2")])
    assert "mixed-weights" not in codes([on(None, 0.99, "1"), on("aa", 0.99, "2")])  # an older record: by accuracy
    assert "mixed-weights" in codes([on(None, 0.993, "1"), on("aa", 0.9917, "2")])
    assert "mixed-weights" not in codes([on("aa", 0.99, "1"), cell("tq", "pgd", "whitebox", 0.3, [0], weights="bb")])


def test_no_autoattack_fires_where_images_stand_and_autoattack_did_not_run() -> None:
    pgd = [cell("d", "pgd", "bpda", eps, [0, 1]) for eps in (0.1, 0.3)]
    flagged = [f for f in flags.compute(pgd) if f.code == "no-autoattack"]
    assert len(flagged) == 1 and "eps=0.1" in flagged[0].evidence and "eps=0.3" in flagged[0].evidence
    with_aa = [*pgd, cell("d", "autoattack", "whitebox", 0.1, [0]), cell("d", "pgd", "bpda", 0.3, [], tag="strong")]
    assert "no-autoattack" not in codes(with_aa)  # AutoAttack ran at 0.1; at 0.3 no image stands
    assert "no-autoattack" not in codes([cell("d", "pgd", "bpda", 1.0, [0])])  # a sanity cell (eps >= 1)
