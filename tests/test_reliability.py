"""Issue 18, reliability second pass: bad input is one line and exit 2, nothing is lost, nothing is trusted blindly.

Each test names the item of the issue it covers. Most call the command line in-process (``main``); none trains
a model except where a run is the point, and those use the tiny real-data suite.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import gzip
import io
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bench import results
from bench.cli import main
from bench.errors import BenchError, SuiteError
from bench.results import ResultsStore, read_records
from bench.suite import load_suite
from bench.train import ModelCache
from conftest import ROOT, bench, tiny_suite
from test_results import REFERENCE, record

# --- helpers --------------------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    """``bench ARGS`` in this process: (exit code, stdout, stderr). Anything but a BenchError propagates."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("bench: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _denied(path: Any) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Make a directory read-only: ``chmod 555``; as root, who ignores permission bits, the calls that would
    create, change or remove something under it fail with EACCES as they do for everyone else."""
    chmodded: list[Path] = []

    def make(path: Path) -> None:
        path.chmod(0o555)
        chmodded.append(path)
        if os.geteuid() != 0:
            return
        roots = [os.path.abspath(p) for p in chmodded]

        def under(target: Any) -> bool:
            if isinstance(target, int):
                return False
            target = os.path.abspath(os.fsdecode(target))
            return any(target == r or target.startswith(r + os.sep) for r in roots)

        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        real_open, real_mkdir, real_builtin_open = os.open, os.mkdir, builtins.open

        def os_open(target: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & writes and under(target):
                raise _denied(target)
            return real_open(target, flags, *args, **kwargs)

        def builtin_open(target: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if not isinstance(target, int) and any(c in mode for c in "wax+") and under(target):
                raise _denied(target)
            return real_builtin_open(target, mode, *args, **kwargs)

        def mkdir(target: Any, *args: Any, **kwargs: Any) -> None:
            if under(target):
                if os.path.lexists(target):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(target))
                raise _denied(target)
            real_mkdir(target, *args, **kwargs)

        def guard(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(*paths: Any, **kwargs: Any) -> Any:
                for target in paths:
                    if under(target):
                        raise _denied(target)
                return real(*paths, **kwargs)
            return call

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", builtin_open)
        monkeypatch.setattr(io, "open", builtin_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        for name in ("replace", "rename", "link", "unlink", "remove", "rmdir", "symlink"):
            monkeypatch.setattr(os, name, guard(getattr(os, name)))

    yield make
    monkeypatch.undo()
    for path in chmodded:
        path.chmod(0o755)


def reference_lines() -> list[str]:
    return REFERENCE.read_text().splitlines()


def results_dir(tmp_path: Path, lines: list[str], name: str = "out") -> Path:
    out = tmp_path / name
    out.mkdir()
    (out / "cells.jsonl").write_text("".join(line + "\n" for line in lines))
    return out


# --- item 4: nothing a user wrote or a run computed disappears without a copy -----------------------------------


def test_lines_without_a_cell_id_are_moved_to_stale_not_deleted(tmp_path: Path) -> None:
    """Item 4."""
    good = json.dumps(record("a"))
    kept = ['{"note": "written by hand"}', "[1, 2]", json.dumps({**record("b"), "n": "many"})]
    out = results_dir(tmp_path, [good, *kept])
    with pytest.warns(UserWarning, match="3 incomplete or corrupt line"), ResultsStore(out) as store:
        assert [r["cell_id"] for r in store.records()] == ["a"]
        store.rewrite(store.records(), [])
    assert (out / "cells.jsonl").read_text().splitlines() == [json.dumps(record("a"), separators=(",", ":"))]
    assert (out / "cells.stale.jsonl").read_text().splitlines() == kept


def test_a_whole_last_record_without_newline_is_kept(tmp_path: Path) -> None:
    """Item 4: only a line that is not a record is torn; a complete record that lost its newline is kept."""
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(record("a")) + "\n" + json.dumps(record("b")))
    assert [r["cell_id"] for r in read_records(path)] == ["a", "b"]
    with ResultsStore(tmp_path) as store:
        store.append(record("c"))
        assert [r["cell_id"] for r in store.records()] == ["a", "b", "c"]
    assert not (tmp_path / "cells.stale.jsonl").exists()


def test_a_torn_last_line_is_copied_before_it_is_cut(tmp_path: Path) -> None:
    """Item 4."""
    path = tmp_path / "cells.jsonl"
    path.write_text(json.dumps(record("a")) + "\n" + '{"cell_id": "b", "rob')
    with pytest.warns(UserWarning, match="torn last line"), ResultsStore(tmp_path):
        pass
    assert (tmp_path / "cells.stale.jsonl").read_text() == '{"cell_id": "b", "rob\n'


# --- item 5: results that match nothing ----------------------------------------------------------------------


def test_a_cells_file_mixing_two_suites_is_refused_with_a_message(tmp_path: Path) -> None:
    """Item 5: the worst case would AND per-image masks of different models."""
    other = [json.dumps({**json.loads(line), "suite": "other", "cell_id": json.loads(line)["cell_id"] + "x"})
             for line in reference_lines()]
    out = results_dir(tmp_path, reference_lines() + other)
    one_line_error(cli("leaderboard", str(out)), str(out / "cells.jsonl"), "mnist records of different runs",
                   "'regression' vs 'other'")
    assert not (out / "leaderboard.md").exists()


def test_masks_of_a_different_n_are_never_combined(tmp_path: Path) -> None:
    """Item 5: a record of the same suite over 8 images (n differs, so do the images its mask indexes)."""
    first = json.loads(reference_lines()[0])
    small = {**first, "cell_id": "small", "n": 8, "clean_mask": "ff", "robust_mask": "0f"}
    with pytest.raises(BenchError, match="n 500 vs 8"):
        results.check_compatible([first, small])
    out = results_dir(tmp_path, [*reference_lines(), json.dumps(small)])
    one_line_error(cli("leaderboard", str(out)), "n 500 vs 8")


# --- item 7: escapes and symlinks ----------------------------------------------------------------------------


def test_a_suite_named_dot_dot_is_refused(tmp_path: Path) -> None:
    """Item 7: ``results/..`` would be the current directory."""
    path = tiny_suite(tmp_path / "s.toml")
    for name in ("..", ".", ".hidden", "a/b"):
        path.write_text(path.read_text().replace('name = "tiny"', f"name = {json.dumps(name)}", 1))
        with pytest.raises(SuiteError, match="name"):
            load_suite(path)
        path.write_text(path.read_text().replace(f"name = {json.dumps(name)}", 'name = "tiny"', 1))


def test_symlinks_in_out_are_replaced_not_followed(tmp_path: Path) -> None:
    """Item 7: ``leaderboard.md`` and ``cells.csv`` pointing elsewhere: the targets stay untouched."""
    out = results_dir(tmp_path, reference_lines())
    victims = []
    for name in ("leaderboard.md", "cells.csv"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious\n")
        (out / name).symlink_to(victim)
        victims.append(victim)
    code, _, err = cli("leaderboard", str(out))
    assert code == 0, err
    assert all(v.read_text() == "precious\n" for v in victims)
    assert not (out / "leaderboard.md").is_symlink() and "regression" in (out / "leaderboard.md").read_text()


def test_a_symlinked_cells_file_is_never_written_through(tmp_path: Path) -> None:
    """Item 7."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cells.jsonl").symlink_to(victim)
    with pytest.raises(BenchError, match="symbolic link"), ResultsStore(out) as store:
        store.append(record("a"))
    assert victim.read_text() == "precious\n"


# --- item 1 (suite files), 8 and 9: the suite loader ---------------------------------------------------------


def test_a_5000_character_suite_name_exits_2(tmp_path: Path) -> None:
    """Item 1: it used to reach mkdir (File name too long)."""
    path = tiny_suite(tmp_path / "s.toml")
    path.write_text(path.read_text().replace('name = "tiny"', f'name = "{"a" * 5000}"', 1))
    one_line_error(cli("check", str(path)), "name", "1 to 100 letters")


def test_an_eps_list_nested_thousands_deep_exits_2(tmp_path: Path) -> None:
    """Item 1: RecursionError in the TOML parser; also below the recursion limit, a deep value is refused."""
    path = tiny_suite(tmp_path / "s.toml")
    for depth in (5000, 500):
        path.write_text(path.read_text().split("[[attacks]]")[0] +
                        f'[[attacks]]\nname = "fgsm"\neps = {"[" * depth}0.1{"]" * depth}\n')
        one_line_error(cli("check", str(path)), str(path), "nested deeper than")


def test_include_of_a_device_is_refused_at_once(tmp_path: Path) -> None:
    """Item 8: ``include = "/dev/zero"`` was read without limit."""
    path = tiny_suite(tmp_path / "s.toml")
    path.write_text('include = "/dev/zero"\n' + path.read_text())
    one_line_error(cli("check", str(path)), "/dev/zero", "not a regular file")


def test_a_fifo_as_suite_file_is_refused_not_waited_on(tmp_path: Path, bench_env: dict[str, str]) -> None:
    """Item 8: a subprocess, so that a regression hangs only it (and fails on the timeout)."""
    fifo = tmp_path / "suite.toml"
    os.mkfifo(fifo)
    result = bench("check", str(fifo), env=bench_env, timeout=120)
    assert result.returncode == 2 and "not a regular file" in result.stderr, result.stderr


def test_a_huge_suite_file_is_refused(tmp_path: Path) -> None:
    """Item 8."""
    path = tiny_suite(tmp_path / "s.toml")
    path.write_text(path.read_text() + "# " + "x" * (2 << 20) + "\n")
    one_line_error(cli("check", str(path)), str(path), "larger than")


def test_an_error_in_an_included_suite_names_that_file(tmp_path: Path) -> None:
    """Item 9."""
    base = tiny_suite(tmp_path / "base.toml")
    base.write_text(base.read_text().replace("eps = [0.1, 0.3]", "eps = [0.1, 7]"))
    top = tmp_path / "top.toml"
    top.write_text('include = "base.toml"\nname = "top"\n[datasets.mnist]\nn = 50\n')
    line = one_line_error(cli("check", str(top)), f"bench: error: {base}: attacks[0].eps", "included by")
    assert str(top) in line
    top.write_text('include = "base.toml"\nname = "top"\n[datasets.mnist]\nn = -5\n')
    one_line_error(cli("check", str(top)), f"bench: error: {top}: datasets.mnist.n")


def test_the_bpda_table_lists_every_allowed_key(tmp_path: Path) -> None:
    """Item 9: a typo in ``bpda.backward`` was answered with 'allowed: soft_z'."""
    path = tiny_suite(tmp_path / "s.toml", extra='[bpda]\nbackwards = "soft"\n')
    one_line_error(cli("check", str(path)), "bpda.backwards", 'did you mean "backward"', "backward, soft_z")


@pytest.mark.parametrize(("extra", "path", "duplicate"), [
    ('[[defenses]]\nname = "none"\n', "defenses[1]", "as defenses[0]"),
    ('[[attacks]]\nname = "fgsm"\neps = [0.3, 0.5]\nthreat = "bpda"\n', "attacks[1]", "fgsm bpda eps=0.3 on mnist"),
    ('[[defenses]]\nname = "cq"\nlevels = [2, 2]\n', "defenses[1]", "the same defense twice"),
])
def test_duplicate_entries_are_an_error_not_merged(tmp_path: Path, extra: str, path: str, duplicate: str) -> None:
    """Item 9: two entries that expand to the same parameters were silently one."""
    suite = tiny_suite(tmp_path / "s.toml", extra=extra)
    one_line_error(cli("check", str(suite)), f"{suite}: {path}", duplicate)
