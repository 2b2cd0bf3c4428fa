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
import warnings
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
from bench.train import ModelCache, cache_key
from conftest import bench, tiny_suite
from test_results import REFERENCE, record

# --- helpers --------------------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    """``bench ARGS`` in this process: (exit code, stdout, stderr with the warnings). Anything but a BenchError
    propagates."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(list(args))
    return code, out.getvalue(), err.getvalue() + "".join(f"bench: warning: {w.message}\n" for w in caught)


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


# --- item 1: outputs that cannot be written, records that cannot be read -------------------------------------


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only", "under a read-only directory"])
def test_an_unusable_out_exits_2_before_anything_runs(tmp_path: Path, read_only: Callable[[Path], None],
                                                      case: str) -> None:
    """Item 1."""
    suite = tiny_suite(tmp_path / "s.toml")
    blocker = tmp_path / "file"
    blocker.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    out = {"a file": blocker, "under a file": blocker / "out", "read-only": locked,
           "under a read-only directory": locked / "out"}[case]
    read_only(locked)
    one_line_error(cli("run", str(suite), "--out", str(out)), str(out))


def test_report_into_a_missing_directory_exits_2(tmp_path: Path) -> None:
    """Item 1."""
    out = results_dir(tmp_path, reference_lines())
    one_line_error(cli("report", str(out), "--out", str(tmp_path / "missing" / "R.md")), "missing", "does not exist")


def test_perf_out_naming_a_directory_exits_2_before_measuring(tmp_path: Path) -> None:
    """Item 1: it used to measure for minutes, then fail writing."""
    one_line_error(cli("perf", "--images", "2", "--repeats", "1", "--attacks", "fgsm", "--out", str(tmp_path)),
                   str(tmp_path), "is a directory")


def test_every_reader_skips_malformed_records_with_a_warning(tmp_path: Path) -> None:
    """Item 1: records that parse as JSON but lack fields or carry wrong types."""
    lines = reference_lines()
    broken = [{k: v for k, v in json.loads(lines[0]).items() if k != "threat_label"},
              {**json.loads(lines[1]), "robust_acc": "high"}, {**json.loads(lines[2]), "n": 7},
              {**json.loads(lines[3]), "defense_params": None}, {"cell_id": "x"}]
    out = results_dir(tmp_path, [*lines[4:], *map(json.dumps, broken)])
    before = (out / "cells.jsonl").read_bytes()
    for args in (["leaderboard", str(out)], ["audit", str(out)], ["compare", str(out), str(out)],
                 ["report", str(out), "--out", str(tmp_path / "R.md")]):
        code, _, err = cli(*args)
        assert code == 0, (args, err)
        assert "'threat_label' must be a non-empty string, found missing" in err and "'robust_acc' must be" in err
    assert (out / "cells.jsonl").read_bytes() == before


# --- item 2: bad input is exit 2 once, not a failed cell each -----------------------------------------------


def mnist_copy(tmp_path: Path, data_dir: Path) -> Path:
    """A data directory whose MNIST files link to the real ones (replace one to break it)."""
    root = tmp_path / "data"
    (root / "mnist").mkdir(parents=True)
    for source in (data_dir / "mnist").iterdir():
        (root / "mnist" / source.name).symlink_to(source)
    return root


@pytest.fixture
def unreadable(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Make a file unreadable: ``chmod 000``; as root, opening it fails with EACCES as it does for everyone else."""
    def make(path: Path) -> None:
        path.chmod(0)
        if os.geteuid() != 0:
            return
        target = os.path.abspath(path)
        real_open, real_builtin_open = os.open, builtins.open

        def os_open(name: Any, *args: Any, **kwargs: Any) -> int:
            if not isinstance(name, int) and os.path.abspath(os.fsdecode(name)) == target:
                raise _denied(name)
            return real_open(name, *args, **kwargs)

        def builtin_open(name: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(name, int) and os.path.abspath(os.fsdecode(name)) == target:
                raise _denied(name)
            return real_builtin_open(name, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", builtin_open)
        monkeypatch.setattr(io, "open", builtin_open)
    return make


def test_device_bogus_exits_2(tmp_path: Path) -> None:
    """Item 2."""
    suite = tiny_suite(tmp_path / "s.toml")
    one_line_error(cli("run", str(suite), "--out", str(tmp_path / "out"), "--device", "bogus"), "--device bogus")


def test_an_unreadable_data_file_exits_2_before_any_cell(tmp_path: Path, data_dir: Path,
                                                         unreadable: Callable[[Path], None]) -> None:
    """Item 2."""
    data = mnist_copy(tmp_path, data_dir)
    labels = data / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    shutil.copy(data_dir / "mnist" / labels.name, labels)
    unreadable(labels)
    suite, out = tiny_suite(tmp_path / "s.toml"), tmp_path / "out"
    for args in (["check", str(suite)], ["run", str(suite), "--out", str(out)]):
        one_line_error(cli(*args, "--data-dir", str(data)), str(labels), "cannot read")
    assert not (out / "cells.jsonl").exists()


def test_test_images_of_the_wrong_size_exit_2_before_training(tmp_path: Path, data_dir: Path) -> None:
    """Item 2: 32×32 MNIST test images were found only when the trained model met them, in every cell."""
    data = mnist_copy(tmp_path, data_dir)
    images = data / "mnist" / "t10k-images-idx3-ubyte.gz"
    with gzip.open(images, "rb") as f:
        raw = f.read()
    n = struct.unpack(">I", raw[4:8])[0]
    padded = np.pad(np.frombuffer(raw, np.uint8, offset=16).reshape(n, 28, 28), ((0, 0), (2, 2), (2, 2)))
    images.unlink()
    images.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, n, 32, 32) + padded.tobytes(), compresslevel=1))
    suite, out, cache = tiny_suite(tmp_path / "s.toml"), tmp_path / "out", tmp_path / "cache"
    one_line_error(cli("run", str(suite), "--out", str(out), "--data-dir", str(data), "--cache-dir", str(cache)),
                   str(images), "1×32×32", "expected 1×28×28")
    assert not list(cache.rglob("*.pt"))


def test_a_cache_dir_that_is_a_file_exits_2(tmp_path: Path) -> None:
    """Item 2."""
    cache = tmp_path / "cache"
    cache.write_text("")
    suite = tiny_suite(tmp_path / "s.toml")
    one_line_error(cli("run", str(suite), "--out", str(tmp_path / "out"), "--cache-dir", str(cache)), str(cache),
                   "not a directory")


def _build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _trainer(calls: list[int], value: float = 0.5) -> Callable[[nn.Module], dict[str, float]]:
    def train(model: nn.Module) -> dict[str, float]:
        calls.append(1)
        with torch.no_grad():
            model.weight.fill_(value)
        return {"score": value}
    return train


def _score(model: nn.Module) -> dict[str, float]:
    return {"score": round(float(model.weight.detach().mean()), 4)}


def test_a_cache_path_that_is_a_directory_is_an_error_before_training(tmp_path: Path) -> None:
    """Item 2: training ran, then saving into a directory failed, once per cell."""
    cache, calls = ModelCache(tmp_path), []
    weights, _ = cache.paths("mnist", "none", cache_key({"a": 1}))
    weights.mkdir(parents=True)
    with pytest.raises(BenchError, match="expected a file in the model cache"):
        cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls))
    assert calls == []


# --- item 6: a poisoned model cache ------------------------------------------------------------------------


def _trained(tmp_path: Path, calls: list[int]) -> tuple[ModelCache, Path, Path]:
    cache = ModelCache(tmp_path)
    cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)
    return cache, next(tmp_path.glob("mnist/*.pt")), next(tmp_path.glob("mnist/*.json"))


def test_nan_weights_are_rejected_and_retrained(tmp_path: Path) -> None:
    """Item 6: a valid state dict full of NaN looked like a perfect defense."""
    calls: list[int] = []
    cache, weights, _ = _trained(tmp_path, calls)
    torch.save({"weight": torch.full((2, 3), float("nan")), "bias": torch.zeros(2)}, weights)
    with pytest.warns(UserWarning, match="non-finite weights"):
        model, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)
    assert calls == [1, 1] and not facts["cached"] and torch.isfinite(model.weight).all()


def test_a_sidecar_of_other_weights_is_not_believed(tmp_path: Path) -> None:
    """Item 6: weights replaced under their sidecar; its stale facts were reported."""
    calls: list[int] = []
    cache, weights, sidecar = _trained(tmp_path, calls)
    torch.save({"weight": torch.full((2, 3), 0.25), "bias": torch.zeros(2)}, weights)
    with pytest.warns(UserWarning, match="describes other weights"):
        _, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)
    assert calls == [1] and facts["cached"] and facts["score"] == 0.25
    assert json.loads(sidecar.read_text())["score"] == 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tied again: no warning
        cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)


def test_a_corrupt_sidecar_keeps_a_good_checkpoint(tmp_path: Path) -> None:
    """Item 6: a corrupt sidecar used to discard (retrain) a good checkpoint."""
    calls: list[int] = []
    cache, _, sidecar = _trained(tmp_path, calls)
    sidecar.write_text("{")
    with pytest.warns(UserWarning, match="unreadable sidecar"):
        model, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)
    assert calls == [1] and facts["cached"] and torch.equal(model.weight, torch.full((2, 3), 0.5))


def test_a_checkpoint_disagreeing_with_its_accuracy_is_retrained(tmp_path: Path) -> None:
    """Item 6: the verified fact (here a score, in the harness the accuracy on 1,000 test images) is recomputed
    after loading; an older sidecar without a hash is believed only when it agrees."""
    calls: list[int] = []
    cache, weights, sidecar = _trained(tmp_path, calls)
    facts = json.loads(sidecar.read_text())
    del facts["weights_sha256"]
    sidecar.write_text(json.dumps(facts))
    torch.save({"weight": torch.full((2, 3), 0.9), "bias": torch.zeros(2)}, weights)
    with pytest.warns(UserWarning, match="sidecar records 0.5"):
        model, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)
    assert calls == [1, 1] and facts["score"] == 0.5 and torch.equal(model.weight, torch.full((2, 3), 0.5))


# --- item 9: misleading checks -----------------------------------------------------------------------------


def test_compare_against_an_empty_reference_exits_2(tmp_path: Path) -> None:
    """Item 9: '0/0 reference cells match' passed."""
    run = results_dir(tmp_path, reference_lines(), "run")
    empty = results_dir(tmp_path, [], "empty")
    one_line_error(cli("compare", str(run), str(empty)), "holds no successful cell records")
    failed = results_dir(tmp_path, [json.dumps({**record("e"), "error": "RuntimeError: x", "robust_acc": None})],
                         "failed")
    one_line_error(cli("compare", str(run), str(failed)), "holds no successful cell records")


def test_check_reads_the_data_and_knows_its_size(tmp_path: Path, data_dir: Path) -> None:
    """Item 9: n beyond the test set passed, and only the files' existence was checked."""
    suite = tiny_suite(tmp_path / "s.toml", n=20000)
    one_line_error(cli("check", str(suite)), "datasets.mnist.n = 20000", "only 10000 images")
    data = mnist_copy(tmp_path, data_dir)
    labels = data / "mnist" / "t10k-labels-idx1-ubyte.gz"
    truncated = labels.read_bytes()[:1000]
    labels.unlink()
    labels.write_bytes(truncated)
    one_line_error(cli("check", str(tiny_suite(tmp_path / "t.toml")), "--data-dir", str(data)), str(labels))


@pytest.mark.parametrize("flag", [["--address", "auto"], ["--gpus-per-cell", "1"], ["--cpus-per-cell", "2"]])
def test_ray_flags_without_the_ray_executor_exit_2(tmp_path: Path, flag: list[str]) -> None:
    """Item 9: they were silently ignored."""
    suite = tiny_suite(tmp_path / "s.toml")
    one_line_error(cli("run", str(suite), "--out", str(tmp_path / "out"), *flag), flag[0], "--executor ray")


def test_a_read_only_cache_holding_the_model_is_used(tmp_path: Path, read_only: Callable[[Path], None]) -> None:
    """Item 9: each cell failed creating the model's .lock; a model the cache lacks is one clear error."""
    calls: list[int] = []
    cache, _, _ = _trained(tmp_path, calls)
    read_only(tmp_path / "mnist")
    read_only(tmp_path)
    model, facts = cache.get_or_train("mnist", "none", {"a": 1}, _build, _trainer(calls), _score)
    assert calls == [1] and facts["cached"] and torch.equal(model.weight, torch.full((2, 3), 0.5))
    with pytest.raises(BenchError, match="writable directory"):
        cache.get_or_train("mnist", "none", {"a": 2}, _build, _trainer(calls), _score)


def test_a_run_recomputes_malformed_records_and_keeps_a_copy(tmp_path: Path, bench_env: dict[str, str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Items 1 and 4 through ``bench run``: a record of the grid with a wrong mask crashed the leaderboard after
    the remaining cells were computed; a line without a cell id vanished on rewrite."""
    monkeypatch.setenv("BENCH_CACHE_DIR", bench_env["BENCH_CACHE_DIR"])
    suite, out = tiny_suite(tmp_path / "s.toml", n=20, eps="[0.1, 0.2]"), tmp_path / "out"
    suite.write_text(suite.read_text().replace('threat = ["whitebox", "bpda"]', 'threat = "whitebox"'))
    assert cli("run", str(suite), "--out", str(out), "--no-progress")[0] == 0
    first, second = (out / "cells.jsonl").read_text().splitlines()
    broken = json.dumps({**json.loads(second), "robust_mask": "zz"})
    (out / "cells.jsonl").write_text(f"{first}\n{broken}\n{{\"note\": \"mine\"}}\n{first[:50]}")
    code, stdout, err = cli("run", str(suite), "--out", str(out), "--no-progress")
    assert code == 0 and "1 resumed, 1 computed" in stdout, err
    assert (out / "cells.stale.jsonl").read_text().splitlines() == [broken, '{"note": "mine"}', first[:50]]
    assert [json.loads(line)["cell_id"] for line in (out / "cells.jsonl").read_text().splitlines()] == \
        [json.loads(first)["cell_id"], json.loads(second)["cell_id"]]


def test_records_say_which_images_their_masks_index(tmp_path: Path) -> None:
    """Item 5: the sample (first n or a seeded draw) is part of what must match before masks are combined."""
    from bench.evaluate import record_base
    from bench.grid import expand

    path = tiny_suite(tmp_path / "s.toml")
    path.write_text(path.read_text().replace("n = 200", 'n = 200\nsample = "random"'))
    base = record_base(expand(load_suite(path))[0])
    assert base["sample"] == "random"
    with pytest.raises(BenchError, match="sample 'random' vs 'first'"):
        results.check_compatible([base, {**base, "sample": "first"}])
