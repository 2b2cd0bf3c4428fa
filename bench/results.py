"""The results store: ``OUT/cells.jsonl``, one JSON object per finished cell, and the lock on ``OUT``.

Each record is written as one complete line, flushed and fsync'ed before the next cell starts, so a killed run
loses at most the cell in flight. Readers take only well-formed records (:func:`check_record`) and warn about
every other line; the writer moves such lines (a torn last line, a corrupt or hand-edited one) to
``cells.stale.jsonl`` before it appends: nothing a user wrote or a run computed disappears without a copy.
One writer per directory: ``OUT/.lock`` is held with an OS lock (``flock``), which the kernel releases when its
holder dies, so a crashed run never leaves it stuck and two runs can never both hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import string
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError

CELLS = "cells.jsonl"
STALE = "cells.stale.jsonl"
LOCK = ".lock"
MAX_LINE = 1 << 20  # bytes; a record with the masks of 10,000 images is about 6 kB
MAX_N = 10_000_000
SHOWN_BAD_LINES = 5  # bad lines warned about one by one; the rest are counted

TEXT = ("cell_id", "compute_id", "suite", "dataset", "defense", "defense_name", "attack", "attack_name", "threat",
        "threat_label", "norm")
FLAGS = ("targeted", "gradient_free", "iterative")
TABLES = ("defense_params", "attack_params")
FRACTIONS = ("clean_acc", "robust_acc", "success_rate")
NORMS = ("l0", "l2", "linf")
MASKS = ("clean_mask", "robust_mask")


def pack_mask(flags: Iterable[bool]) -> str:
    """Per-image booleans as a compact hex bitmask (8 images per byte, first image in the high bit)."""
    return np.packbits(np.fromiter(flags, dtype=bool)).tobytes().hex()


def unpack_mask(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mask(value: Any, n: int) -> bool:
    return isinstance(value, str) and len(value) == 2 * math.ceil(n / 8) and all(c in string.hexdigits for c in value)


def check_record(record: Any) -> str | None:
    """What makes ``record`` unusable as a cell record, or None: the fields the readers (leaderboard, flags,
    report, compare, resume) rely on, with their types and ranges. Other fields are not checked, so records of a
    newer harness that adds fields stay readable."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key in TEXT:
        if not isinstance(record.get(key), str) or not record[key]:
            return f"{key!r} must be a non-empty string, found {_found(record, key)}"
    if not all(c.isalnum() or c in "-_." for c in record["dataset"]) or record["dataset"].startswith("."):
        return f"'dataset' must be a plain name, found {_found(record, 'dataset')}"
    for key in FLAGS:
        if not isinstance(record.get(key), bool):
            return f"{key!r} must be true or false, found {_found(record, key)}"
    for key in TABLES:
        if not isinstance(record.get(key), dict):
            return f"{key!r} must be an object, found {_found(record, key)}"
    n = record.get("n")
    if not _integer(n) or not 1 <= n <= MAX_N:
        return f"'n' must be an integer in [1, {MAX_N}], found {_found(record, 'n')}"
    if not _integer(record.get("seed")) or record["seed"] < 0:
        return f"'seed' must be a non-negative integer, found {_found(record, 'seed')}"
    for key in ("eps", *NORMS):
        if key not in record or record[key] is not None and not (_number(record[key]) and record[key] >= 0):
            return f"{key!r} must be a non-negative number or null, found {_found(record, key)}"
    if not _number(record.get("seconds")) or record["seconds"] < 0:
        return f"'seconds' must be a non-negative number, found {_found(record, 'seconds')}"
    if record.get("purpose") is not None and not isinstance(record["purpose"], str):
        return f"'purpose' must be a string, found {_found(record, 'purpose')}"
    if record.get("purpose") == "convergence" and not _integer(record["attack_params"].get("steps")):
        return "a convergence check must name its attack's 'steps'"
    error = record.get("error")
    if error is not None:
        if not isinstance(error, str) or not error:
            return f"'error' must be null or a message, found {_found(record, 'error')}"
        for key in FRACTIONS:
            if key not in record or record[key] is not None and not (_number(record[key]) and 0 <= record[key] <= 1):
                return f"{key!r} must be a fraction in [0, 1] or null, found {_found(record, key)}"
        return None
    for key in (*FRACTIONS, *(["detected_acc"] if "detected_acc" in record else [])):
        if not _number(record.get(key)) or not 0 <= record[key] <= 1:
            return f"{key!r} must be a fraction in [0, 1], found {_found(record, key)}"
    for key in (*MASKS, *(["detected_mask"] if "detected_mask" in record else [])):
        if not _mask(record.get(key), n):
            return f"{key!r} must be a hex mask of {n} images ({2 * math.ceil(n / 8)} digits), found " \
                   f"{_found(record, key)}"
    return _check_measured(record, n)


def _check_measured(record: dict[str, Any], n: int) -> str | None:
    """The optional fields the flags and the leaderboard read: the model probe, the loss trend, the ensemble
    stages and the examples of the sheet."""
    if "grad_zero" in record and not (_number(record["grad_zero"]) and 0 <= record["grad_zero"] <= 1):
        return f"'grad_zero' must be a fraction in [0, 1], found {_found(record, 'grad_zero')}"
    if "randomized" in record and not isinstance(record["randomized"], bool):
        return f"'randomized' must be true or false, found {_found(record, 'randomized')}"
    if "eot" in record and not (isinstance(record["eot"], int) and not isinstance(record["eot"], bool)
                                and record["eot"] >= 1):
        return f"'eot' must be an integer ≥ 1, found {_found(record, 'eot')}"
    if "bpda_backward" in record and record["bpda_backward"] not in ("identity", "exact"):
        return f"'bpda_backward' must be \"identity\" or \"exact\", found {_found(record, 'bpda_backward')}"
    if "late_loss_gain" in record and not _number(record["late_loss_gain"]):
        return f"'late_loss_gain' must be a number, found {_found(record, 'late_loss_gain')}"
    if "defense_resolved" in record and not isinstance(record["defense_resolved"], str):
        return f"'defense_resolved' must be a string, found {_found(record, 'defense_resolved')}"
    stages = record.get("components", [])
    if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("attack"), str) and _number(s.get("robust_acc"))
            and 0 <= s["robust_acc"] <= 1 and _mask(s.get("robust_mask"), n) for s in stages):
        return "'components' must be a list of {attack, robust_acc, robust_mask} stages"
    examples = record.get("examples", {})
    if not isinstance(examples, dict) or examples and not all(
            isinstance(examples.get(k), dict) and isinstance(examples[k].get("uint8"), str)
            and isinstance(examples[k].get("shape"), list) and all(_integer(d) and d > 0 for d in examples[k]["shape"])
            for k in ("clean", "adv", "seen")) or examples and not all(
            isinstance(examples.get(k), list) for k in ("clean_pred", "clean_prob", "adv_pred", "adv_prob")):
        return "'examples' must hold the clean, adversarial and preprocessed images and the predictions"
    return None


def _found(record: dict[str, Any], key: str) -> str:
    """The value of ``key`` as shown in a message (short), or ``missing``."""
    if key not in record:
        return "missing"
    try:
        text = json.dumps(record[key])
    except (RecursionError, ValueError):
        return "a deeply nested value"
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Line:
    """One line of a cells file: its number, its bytes (newline excluded), and its record or what is wrong."""

    number: int
    raw: bytes
    record: dict[str, Any] | None
    problem: str | None
    terminated: bool


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a well-formed record line, else (None, what is wrong with it)."""
    if len(raw) > MAX_LINE:
        return None, f"line of {len(raw)} bytes, longer than {MAX_LINE}"
    try:
        record = json.loads(raw, parse_float=_finite, parse_constant=_not_a_number)
    except RecursionError:
        return None, "JSON nested too deeply"
    except ValueError as exc:
        return None, f"not JSON ({str(exc).splitlines()[0][:60]})"
    problem = check_record(record)
    return (None, problem) if problem else (record, None)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} out of range")
    return value


def _not_a_number(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def scan(path: Path) -> list[Line]:
    """Every non-blank line of ``path``, parsed and checked."""
    lines = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            terminated = raw.endswith(b"\n")
            body = raw.rstrip(b"\r\n")
            if body.strip():
                record, problem = parse_line(body)
                lines.append(Line(number, body, record, problem, terminated))
    return lines


def read_records(path: Path) -> list[dict[str, Any]]:
    """The well-formed records of a cells.jsonl file; every other line is skipped with a warning naming it."""
    if not path.is_file():
        return []
    try:
        lines = scan(path)
    except OSError as exc:
        raise BenchError(f"{path}: cannot read ({exc.strerror or exc})") from None
    bad = [line for line in lines if line.problem]
    for line in bad[:SHOWN_BAD_LINES]:
        warnings.warn(f"{path}:{line.number}: incomplete or corrupt line skipped: {line.problem}", stacklevel=2)
    if len(bad) > SHOWN_BAD_LINES:
        warnings.warn(f"{path}: {len(bad) - SHOWN_BAD_LINES} more incomplete or corrupt lines skipped", stacklevel=2)
    return [line.record for line in lines if line.record is not None]


def group_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a record's per-image masks are indexed by: its run (suite and seed: the models) and its evaluated
    images (dataset, n and sample). Masks of records with different keys must never be combined."""
    return (record["dataset"], record["suite"], record.get("suite_seed"), record["n"], record.get("sample"))


def check_compatible(records: Iterable[dict[str, Any]], where: str = "") -> None:
    """Refuse records of one dataset that come from different runs (mixed suites, seeds, n or samples): a
    per-image worst case over them would AND masks of different images or of different models."""
    first: dict[str, tuple[Any, ...]] = {}
    for record in records:
        key = group_key(record)
        seen = first.setdefault(record["dataset"], key)
        if key != seen:
            names = ("suite", "seed", "n", "sample")
            differ = ", ".join(f"{name} {a!r} vs {b!r}" for name, a, b in zip(names, seen[1:], key[1:]) if a != b)
            raise BenchError(f"{where + ': ' if where else ''}{record['dataset']} records of different runs are "
                             f"mixed ({differ}); their per-image results cannot be combined: keep each suite's "
                             f"cells in a directory of its own")


def prepare_dir(path: Path) -> None:
    """Create the results directory ``path`` if needed and make sure files can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except FileExistsError:
        raise BenchError(f"results directory {path}: exists and is not a directory") from None
    except OSError as exc:
        raise BenchError(f"results directory {path}: cannot be used ({exc.strerror or exc}); expected a "
                         f"writable directory") from None


def write_text(path: Path, text: str) -> None:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers never see half a file, several
    writers never share a temporary file, and a symbolic link at ``path`` is replaced, never written through."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise BenchError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _append(path: Path, lines: Iterable[bytes]) -> None:
    """Append lines durably, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise BenchError(f"{path}: cannot append ({exc.strerror or exc}; a symbolic link?)") from None
    with os.fdopen(fd, "wb") as f:
        f.writelines(line + b"\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode()


class ResultsStore:
    """Appends and reads the cells of one results directory; use as a context manager to hold the lock."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.dir = Path(out)
        self.path = self.dir / CELLS
        self.stale = self.dir / STALE
        self._lock = self.dir / LOCK
        self._fd: int | None = None

    def __enter__(self) -> ResultsStore:
        prepare_dir(self.dir)
        for path in (self.path, self.stale):
            if path.is_symlink() or path.exists() and not path.is_file():
                raise BenchError(f"{path}: expected a regular file, found a symbolic link or something else; "
                                 f"refusing to write through it")
        self._fd = _take_lock(self._lock)
        try:
            self._sanitize()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):  # unlinked while still held: a waiter that locked it retries
                self._lock.unlink()
            os.close(self._fd)
            self._fd = None

    def _sanitize(self) -> None:
        """Leave only well-formed, newline-terminated records in cells.jsonl: every other line (a torn last line,
        a corrupt or hand-edited one) is copied to cells.stale.jsonl first, then cut out."""
        if not self.path.is_file():
            return
        lines = scan(self.path)
        bad = [line for line in lines if line.problem]
        if not bad:
            if lines and not lines[-1].terminated:  # a whole record whose newline was lost: keep it, end the line
                _append(self.path, [b""])
            return
        _append(self.stale, [line.raw for line in bad])
        tmp = self.path.with_name(f".{CELLS}.tmp")
        tmp.unlink(missing_ok=True)
        _append(tmp, [line.raw for line in lines if not line.problem])
        os.replace(tmp, self.path)
        torn = bad[-1] if not bad[-1].terminated else None
        if torn is not None:
            warnings.warn(f"{self.path}: torn last line ({len(torn.raw)} bytes) moved to {STALE}", stacklevel=3)
        if len(bad) > (torn is not None):
            shown = "; ".join(f"line {line.number}: {line.problem}" for line in bad[:SHOWN_BAD_LINES] if line != torn)
            warnings.warn(f"{self.path}: {len(bad) - (torn is not None)} incomplete or corrupt line(s) moved to "
                          f"{STALE} ({shown})", stacklevel=3)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and make it durable before returning."""
        _append(self.path, [_dump(record)])

    def rewrite(self, keep: list[dict[str, Any]], stale: list[dict[str, Any]]) -> None:
        """Keep ``keep`` in cells.jsonl and append ``stale`` to cells.stale.jsonl (atomic replace)."""
        if stale:
            _append(self.stale, [_dump(r) for r in stale])
        tmp = self.path.with_name(f".{CELLS}.tmp")
        tmp.unlink(missing_ok=True)
        _append(tmp, [_dump(r) for r in keep])
        os.replace(tmp, self.path)


def _take_lock(path: Path) -> int:
    """An open descriptor of ``path`` holding an exclusive ``flock``; BenchError when another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BenchError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BenchError(f"{path.parent} is in use by another bench run (pid {owner}); wait for it to finish "
                             f"or choose another --out") from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}".encode(), 0)
            return fd
        os.close(fd)  # its holder removed it while releasing: lock the file that is there now


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False

