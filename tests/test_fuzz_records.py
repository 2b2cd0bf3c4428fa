"""cells.jsonl files are untrusted input too: hundreds of corrupted ones (truncated, wrong types, missing fields,
mixed suites, huge lines ...) through every reader, and a few through ``bench run``. Exit 0 or 2 with one line,
never a traceback, and nothing a file held disappears without a copy.

The corruptions start from real records (the committed regression run, and a tiny real-data run for ``run``).
Readers are called in-process; the figures, a few runs and one subprocess per command are the slow minority.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from bench import plots, sheet
from bench.results import MAX_LINE
from conftest import bench, tiny_suite
from test_reliability import cli
from test_results import REFERENCE

BASE = [line.encode() for line in REFERENCE.read_text().splitlines()]
NUMBERS = ("n", "seed", "eps", "clean_acc", "robust_acc", "success_rate", "l0", "l2", "linf", "seconds",
           "suite_seed", "detected_acc")
ODD_NUMBERS = (-1, -0.0, 0, 1.5, 7, 10**12, 2**63, 1e308, "0.5", None, True)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
KINDS = ("drop_field", "wrong_type", "odd_number", "mixed_run", "huge_line", "garbage", "not_object", "deep",
         "non_finite", "duplicate", "mask", "blank_and_crlf", "error_record", "odd_text")

Draw = st.DrawFn


def _pick(draw: Draw, lines: list[bytes]) -> tuple[int, dict[str, Any]] | None:
    """A line that is still a JSON object, and its object."""
    objects = []
    for i, line in enumerate(lines):
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and value:
            objects.append((i, value))
    return draw(st.sampled_from(objects)) if objects else None


def _dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def mutate(draw: Draw, lines: list[bytes], kind: str) -> list[bytes]:
    lines = list(lines)
    where = draw(st.integers(0, len(lines)))
    picked = _pick(draw, lines)
    if kind in ("huge_line", "garbage", "not_object", "deep", "blank_and_crlf") or picked is None:
        insert = {
            "huge_line": lambda: draw(st.sampled_from([b'{"cell_id": "' + b"a" * (MAX_LINE + 10) + b'"}',
                                                       b"x" * (MAX_LINE + draw(st.integers(-10, 10))),
                                                       BASE[0][:-1] + b', "note": "' + b"z" * MAX_LINE + b'"}'])),
            "garbage": lambda: draw(st.binary(max_size=200)),
            "not_object": lambda: _dump(draw(JSON.filter(lambda v: not isinstance(v, dict)))),
            "deep": lambda: b"[" * draw(st.integers(900, 200_000)) + draw(st.sampled_from([b"", b"]" * 10])),
            "blank_and_crlf": lambda: draw(st.sampled_from([b"", b"   ", b"\r", b"\t"])),
        }.get(kind, lambda: draw(st.binary(max_size=50)))()
        if kind == "blank_and_crlf" and draw(st.booleans()):
            lines = [line + b"\r" for line in lines]
        lines.insert(where, insert)
        return lines
    i, record = picked
    key = draw(st.sampled_from(sorted(record)))
    if kind == "drop_field":
        del record[key]
    elif kind == "wrong_type":
        record[key] = draw(JSON)
    elif kind == "odd_number":
        record[draw(st.sampled_from(NUMBERS))] = draw(st.sampled_from(ODD_NUMBERS))
    elif kind == "mixed_run":
        field = draw(st.sampled_from(["suite", "n", "suite_seed", "sample", "dataset"]))
        value = draw(st.sampled_from(["other", 8, 1, "random", "cifar10"]))
        for j in draw(st.lists(st.integers(0, len(lines) - 1), max_size=len(lines))):
            try:
                other = json.loads(lines[j])
            except (ValueError, RecursionError):
                continue
            if isinstance(other, dict):
                other[field] = value
                if draw(st.booleans()) and isinstance(other.get("cell_id"), str):
                    other["cell_id"] += "-mixed"
                lines[j] = _dump(other)
        return lines
    elif kind == "non_finite":
        record[draw(st.sampled_from(NUMBERS))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    elif kind == "duplicate":
        lines.insert(where, _dump({**record, "robust_acc": draw(st.sampled_from([0.0, 1.0, 0.5]))}))
        return lines
    elif kind == "mask":
        record[draw(st.sampled_from(["clean_mask", "robust_mask", "detected_mask"]))] = draw(st.sampled_from(
            ["", "0", "zz", "FF" * 63, "ff" * 64, "ff" * 62 + "0g", "ff" * 63]))
    elif kind == "error_record":
        record.update(error=draw(st.sampled_from(["RuntimeError: boom", "", 3, None])), clean_acc=None,
                      robust_acc=None, success_rate=None)
        for mask in draw(st.sets(st.sampled_from(["clean_mask", "robust_mask"]))):
            record.pop(mask, None)
    elif kind == "odd_text":
        record[draw(st.sampled_from(["dataset", "suite", "defense", "attack", "threat", "threat_label", "norm",
                                     "attack_name", "cell_id"]))] = draw(st.sampled_from(
            ["", "../../etc", ".", "\u0000", "é" * 300, "mnist/../x", " "]))
    lines[i] = _dump(record)
    return lines


@st.composite
def corrupted(draw: Draw, base: list[bytes] = BASE) -> bytes:
    lines = list(base)
    for _ in range(draw(st.integers(1, 3))):
        lines = mutate(draw, lines, draw(st.sampled_from(KINDS)))
    text = b"".join(line + b"\n" for line in lines)
    cut = draw(st.sampled_from(["none", "none", "torn", "newline"]))
    if cut == "torn":
        text = text[:draw(st.integers(0, len(text)))]
    elif cut == "newline":
        text = text.rstrip(b"\n")
    return text


def readers(out: Path, data: bytes) -> None:
    """Every reader on ``out``: exit 0, or 2 with one line; ``cells.jsonl`` untouched."""
    path = out / "cells.jsonl"
    path.write_bytes(data)
    for args in (["leaderboard", str(out)], ["audit", str(out)], ["compare", str(out), str(out)],
                 ["report", str(out), "--out", str(out / "REPRODUCTION.md")]):
        code, _, err = cli(*args)
        errors = [line for line in err.splitlines() if line.startswith("bench: error:")]
        assert (code, len(errors)) in ((0, 0), (2, 1)), (args, err[-2000:])
    assert path.read_bytes() == data


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-records")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=corrupted())
def test_corrupted_cells_files_through_every_reader(out: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """500 files, without the figures (the test below draws them; drawing the example sheet made each file cost
    about a second)."""
    monkeypatch.setattr(plots, "write", lambda records, where, worst: [])
    monkeypatch.setattr(sheet, "write", lambda records, where: [])
    readers(out, data)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=corrupted())
def test_corrupted_cells_files_with_figures(out: Path, data: bytes) -> None:
    readers(out, data)


def _copies(out: Path) -> tuple[set[bytes], list[Any]]:
    """The raw lines and the parsed records now in cells.jsonl and cells.stale.jsonl."""
    raw: set[bytes] = set()
    parsed: list[Any] = []
    for name in ("cells.jsonl", "cells.stale.jsonl"):
        path = out / name
        for line in path.read_bytes().split(b"\n") if path.exists() else []:
            raw.add(line.rstrip(b"\r"))
            try:
                parsed.append(json.loads(line))
            except (ValueError, RecursionError):
                pass
    return raw, parsed


def _kept(line: bytes, raw: set[bytes], parsed: list[Any]) -> bool:
    line = line.rstrip(b"\r")
    if not line.strip() or line in raw:
        return True
    try:
        return json.loads(line) in parsed
    except (ValueError, RecursionError):
        return False


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, cache_dir: Path) -> tuple[Path, list[bytes]]:
    """A real run of a 2-cell suite (trains once per session cache) and its records."""
    root = tmp_path_factory.mktemp("fuzz-run")
    suite = tiny_suite(root / "s.toml", n=20, eps="[0.1, 0.2]")
    suite.write_text(suite.read_text().replace('threat = ["whitebox", "bpda"]', 'threat = "whitebox"'))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BENCH_DATA_DIR", str(data_dir))
        patch.setenv("BENCH_CACHE_DIR", str(cache_dir))
        code, _, err = cli("run", str(suite), "--out", str(root / "first"), "--no-progress")
    assert code == 0, err
    return suite, (root / "first" / "cells.jsonl").read_bytes().splitlines()


@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no slow shrinking
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_run_over_a_corrupted_cells_file_keeps_a_copy_of_every_line(
        tiny_run: tuple[Path, list[bytes]], tmp_path_factory: pytest.TempPathFactory, data_dir: Path,
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch, data: st.DataObject) -> None:
    """Its own records and the regression run's, corrupted: whatever is not a valid cell of the grid is moved to
    cells.stale.jsonl (copied, never deleted) and recomputed."""
    suite, own = tiny_run
    text = data.draw(corrupted(own + BASE[:5]))
    out = tmp_path_factory.mktemp("run")
    (out / "cells.jsonl").write_bytes(text)
    monkeypatch.setenv("BENCH_DATA_DIR", str(data_dir))
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache_dir))
    code, _, err = cli("run", str(suite), "--out", str(out), "--no-progress")
    assert code in (0, 2) and "Traceback" not in err, err[-2000:]
    raw, parsed = _copies(out)
    lost = [line[:80] for line in text.split(b"\n") if not _kept(line, raw, parsed)]
    assert not lost, lost
    if code == 0:
        assert {json.loads(line)["cell_id"] for line in (out / "cells.jsonl").read_bytes().splitlines()} == \
            {json.loads(line)["cell_id"] for line in own}


@pytest.mark.parametrize("command", ["leaderboard", "audit", "compare"])
def test_the_command_line_on_a_corrupted_file(tmp_path: Path, bench_env: dict[str, str], command: str) -> None:
    """A handful through real subprocesses: one line on stderr for an error, never a traceback."""
    lines = list(BASE)
    lines[3] = lines[3].replace(b'"robust_mask":"', b'"robust_mask":"zz')
    lines[7] = b'{"suite": "regression", "cell_id": 7}'
    (tmp_path / "cells.jsonl").write_bytes(b"\n".join(lines) + b"\n" + b"[" * 100_000 + b"\n" + BASE[9][:40])
    result = bench(command, str(tmp_path), *([str(tmp_path)] if command == "compare" else []), env=bench_env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("incomplete or corrupt line skipped") == 4, result.stderr
