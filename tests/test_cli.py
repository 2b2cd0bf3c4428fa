"""The command line: exit codes and one-line messages for user errors, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import bench, tiny_suite


def one_line_error(result, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(("edit", "needles"), [
    (lambda t: "colour = 1\n" + t, ("colour", "unknown key")),
    (lambda t: t.replace('name = "none"', 'name = "qusec"'), ("defenses[0].name", "unknown defense")),
    (lambda t: t.replace("[0.1, 0.3]", "[-0.3]"), ("attacks[0].eps", "-0.3")),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_suites_exit_2_with_one_line(tmp_path: Path, bench_env: dict[str, str], command: str, edit,  # type: ignore[no-untyped-def]
                                         needles: tuple[str, ...]) -> None:
    path = tiny_suite(tmp_path / "s.toml")
    path.write_text(edit(path.read_text()))
    one_line_error(bench(command, str(path), env=bench_env), str(path), *needles)


@pytest.mark.parametrize("command", ["check", "run"])
def test_missing_data_directory_exits_2(tmp_path: Path, bench_env: dict[str, str], command: str) -> None:
    path = tiny_suite(tmp_path / "s.toml")
    env = {**bench_env, "BENCH_DATA_DIR": str(tmp_path / "nowhere")}
    one_line_error(bench(command, str(path), env=env), "nowhere", "does not exist")


def test_missing_suite_file_exits_2(tmp_path: Path, bench_env: dict[str, str]) -> None:
    one_line_error(bench("check", str(tmp_path / "absent.toml"), env=bench_env), "cannot read")


def test_check_ok_and_list(tmp_path: Path, bench_env: dict[str, str]) -> None:
    result = bench("check", str(tiny_suite(tmp_path / "s.toml")), env=bench_env)
    assert result.returncode == 0 and "4 cells" in result.stdout
    listing = bench("list", env=bench_env)
    assert listing.returncode == 0 and "none" in listing.stdout and "fgsm" in listing.stdout


def test_leaderboard_of_an_empty_directory_exits_2(tmp_path: Path, bench_env: dict[str, str]) -> None:
    one_line_error(bench("leaderboard", str(tmp_path), env=bench_env), "cells.jsonl")
    one_line_error(bench("audit", str(tmp_path), env=bench_env), "cells.jsonl")


def test_no_progress_silences_every_bar(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """Training and substitute bars too: a fresh model cache makes the run train."""
    env = {k: v for k, v in bench_env.items() if k != "BENCH_NO_PROGRESS"}
    env["BENCH_CACHE_DIR"] = str(tmp_path / "cache")
    suite = tiny_suite(tmp_path / "s.toml", n=20, eps="[0.1]")
    result = bench("run", str(suite), "--out", str(tmp_path / "out"), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    assert "train mnist" not in result.stderr and "batch" not in result.stderr


@pytest.mark.parametrize(("only", "needles"), [("colour=red", ("colour", "FIELD=PATTERN")),
                                                ("defense=qusec*", ("selects none", "4 cells"))])
def test_bad_only_exits_2_with_one_line(tmp_path: Path, bench_env: dict[str, str], only: str,
                                        needles: tuple[str, ...]) -> None:
    path = tiny_suite(tmp_path / "s.toml")
    one_line_error(bench("run", str(path), "--only", only, "--dry-run", env=bench_env), *needles)


def test_train_only_fills_the_cache_and_runs_no_cell(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """Every artifact once, a black-box oracle before its substitute; the run after it trains nothing."""
    env = {**bench_env, "BENCH_CACHE_DIR": str(tmp_path / "cache")}
    extra = '[[attacks]]\nname = "fgsm"\neps = 0.3\nthreat = "blackbox"\n[blackbox]\nrounds = 1\nepochs = 2\n'
    suite = str(tiny_suite(tmp_path / "s.toml", n=20, eps="[0.1]", extra=extra))
    first = bench("run", suite, "--train-only", env=env)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("[1/2] mnist none: trained in") and "substitute-none: trained in" in lines[1]
    assert lines[2].startswith("2 trained")
    weights = sorted((tmp_path / "cache" / "mnist").glob("*.pt"))
    assert len(weights) == 2
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = bench("run", suite, "--train-only", env=env)
    assert again.returncode == 0 and "[1/2] mnist none: cached" in again.stdout and "0 trained" in again.stdout
    cells = bench("run", suite, "--out", str(tmp_path / "out"), env=env)
    assert cells.returncode == 0, cells.stderr
    assert "3/3 cells done" in cells.stdout
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    one_line_error(bench("run", suite, "--train-only", "--out", str(tmp_path / "x"), env=env), "--train-only", "--out")
