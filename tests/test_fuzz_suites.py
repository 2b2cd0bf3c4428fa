"""Suite files are untrusted input: hundreds of malformed suites per run, each must give exit 2 and one line."""

from __future__ import annotations

import contextlib
import copy
import datetime
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.cli import main

VALID: dict[str, Any] = {
    "name": "fuzz", "seed": 0,
    "datasets": {"mnist": {"n": 100, "epochs": 1}},
    "defenses": [{"name": "none"}],
    "attacks": [{"name": "fgsm", "eps": [0.1, 0.3], "threat": ["whitebox", "bpda"]}],
    "blackbox": {"rounds": 2},
}


def toml(value: Any, table: str = "") -> str:
    """A small TOML writer for the structures above (scalars, lists, tables, arrays of tables)."""
    scalars, tables, arrays = [], [], []
    for key, item in value.items():
        name = json.dumps(key)
        if isinstance(item, dict):
            tables.append(f"\n[{table + '.' if table else ''}{name}]\n" + toml(item, f"{table + '.' if table else ''}{name}"))
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            arrays.extend(f"\n[[{table + '.' if table else ''}{name}]]\n" + toml(i, "") for i in item)
        else:
            scalars.append(f"{name} = {literal(item)}")
    return "\n".join(scalars) + "".join(tables) + "".join(arrays) + "\n"


def literal(item: Any) -> str:
    if isinstance(item, bool):
        return str(item).lower()
    if isinstance(item, (int, float)):
        return repr(item) if item == item and abs(item) != float("inf") else ("nan" if item != item else
                                                                              ("inf" if item > 0 else "-inf"))
    if isinstance(item, str):
        return json.dumps(item)
    if isinstance(item, datetime.date):
        return item.isoformat()
    if isinstance(item, list):
        return "[" + ", ".join(literal(i) for i in item) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {literal(v)}" for k, v in item.items()) + "}"


PATHS = [("name",), ("seed",), ("datasets", "mnist", "n"), ("datasets", "mnist", "epochs"),
         ("defenses", 0, "name"), ("attacks", 0, "name"), ("attacks", 0, "eps"), ("attacks", 0, "threat"),
         ("blackbox", "rounds")]
# Values no key accepts: inline tables and dates are never valid scalars here.
NEVER_VALID = st.one_of(st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), min_size=1, max_size=2),
                        st.dates())
OUT_OF_RANGE = {("seed",): st.integers(max_value=-1), ("datasets", "mnist", "n"): st.integers(max_value=0),
                ("datasets", "mnist", "epochs"): st.integers(max_value=0),
                ("attacks", 0, "eps"): st.one_of(st.floats(max_value=0), st.floats(min_value=1.0001),
                                                 st.just(float("nan")), st.just(float("inf"))),
                ("blackbox", "rounds"): st.integers(min_value=11)}
UNKNOWN_NAME = {("defenses", 0, "name"): st.sampled_from(["nonee", "qusec", "", "CQ", "feature squeeze"]),
                ("attacks", 0, "name"): st.sampled_from(["pgdd", "FGSM", "", "carlini"]),
                ("attacks", 0, "threat"): st.sampled_from(["greybox", "white-box", ["whitebox", "bb"], []])}


def put(suite: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    suite = copy.deepcopy(suite)
    node = suite
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return suite


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["unknown_key", "never_valid", "out_of_range", "unknown_name", "empty", "huge",
                                 "drop", "broken_toml", "not_utf8"]))
    suite = VALID
    if kind == "unknown_key":
        where = draw(st.sampled_from([(), ("datasets", "mnist"), ("defenses", 0), ("attacks", 0), ("blackbox",)]))
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        if key in {"name", "seed", "n", "epochs", "eps", "threat", "rounds", "description", "include", "max_cells",
                   "datasets", "defenses", "attacks", "blackbox", "bpda", "checks", "resilience", "sample", "lr",
                   "batch_size", "lr_schedule", "loss", "augment", "train_limit", "target", "holdout", "lam",
                   "oracle"}:
            key += "_x"
        suite = put(suite, (*where, key), draw(st.integers()))
    elif kind == "never_valid":
        suite = put(suite, draw(st.sampled_from(PATHS)), draw(NEVER_VALID))
    elif kind == "out_of_range":
        path = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
        suite = put(suite, path, draw(OUT_OF_RANGE[path]))
    elif kind == "unknown_name":
        path = draw(st.sampled_from(sorted(UNKNOWN_NAME)))
        suite = put(suite, path, draw(UNKNOWN_NAME[path]))
    elif kind == "empty":
        suite = put(suite, draw(st.sampled_from([("attacks", 0, "eps"), ("attacks",), ("defenses",),
                                                 ("datasets",), ("attacks", 0, "threat")])), [] if draw(
            st.booleans()) else {})
    elif kind == "huge":
        size = draw(st.integers(min_value=10_001, max_value=30_000))
        suite = put(suite, ("attacks", 0, "eps"), [round((i + 1) / (size + 1), 9) for i in range(size)])
    elif kind == "drop":
        suite = copy.deepcopy(suite)
        del suite[draw(st.sampled_from(["datasets", "defenses", "attacks"]))]
    text = toml(suite).encode()
    if kind == "broken_toml":
        cut = draw(st.integers(min_value=1, max_value=len(text) - 1))
        text = text[:cut] + draw(st.sampled_from([b"[[", b"= =", b'"', b"\n[datasets\n", b"}", b"\x00"])) + text[cut:]
    elif kind == "not_utf8":
        cut = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + text[cut:]
    return text


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    os.environ["BENCH_DATA_DIR"] = str(data_dir)
    return tmp_path_factory.mktemp("fuzz") / "suite.toml"


def check(path: Path) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["check", str(path)])
    return code, err.getvalue()


def test_the_valid_seed_suite_passes(suite_file: Path) -> None:
    suite_file.write_text(toml(VALID))
    assert check(suite_file) == (0, "")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(malformed())
def test_malformed_suites_exit_2_with_one_line(suite_file: Path, text: bytes) -> None:
    suite_file.write_bytes(text)
    code, err = check(suite_file)
    lines = err.strip().splitlines()
    assert code == 2, (text[:300], err)
    assert len(lines) == 1 and lines[0].startswith(f"bench: error: {suite_file}"), err
