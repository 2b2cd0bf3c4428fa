"""The results store: ``OUT/cells.jsonl``, one JSON object per finished cell, and the lock on ``OUT``.

Each record is written as one complete line, flushed and fsync'ed before the next cell starts, so a killed run
loses at most the cell in flight. A torn last line (power loss mid-write) is detected, dropped with a warning
and cut off on the next write. One writer per directory: ``OUT/.lock`` holds the writer's pid and host and is
taken over when that process is gone, so a crashed run never leaves it stuck.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import BenchError

CELLS = "cells.jsonl"
STALE = "cells.stale.jsonl"


def pack_mask(flags: Iterable[bool]) -> str:
    """Per-image booleans as a compact hex bitmask (8 images per byte, first image in the high bit)."""
    return np.packbits(np.fromiter(flags, dtype=bool)).tobytes().hex()


def unpack_mask(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a cells.jsonl file; a torn or corrupt line is skipped with a warning naming it."""
    if not path.is_file():
        return []
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "cell_id" not in record:
                    raise ValueError("not a cell record")
            except ValueError:
                warnings.warn(f"{path}:{number}: incomplete or corrupt line dropped (interrupted write?)", stacklevel=2)
                continue
            records.append(record)
    return records


class ResultsStore:
    """Appends and reads the cells of one results directory; use as a context manager to hold the lock."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.dir = Path(out)
        self.path = self.dir / CELLS
        self._lock = self.dir / ".lock"
        self._held = False

    def __enter__(self) -> ResultsStore:
        self.dir.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()}@{socket.gethostname()}"
        while True:
            try:
                fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._lock.read_text().strip() if self._lock.exists() else ""
                if owner and _alive(owner):
                    raise BenchError(f"{self.dir} is in use by another bench run (pid {owner}); wait for it to finish "
                                     f"or choose another --out") from None
                self._lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
            break
        self._held = True
        self._repair()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held:
            self._lock.unlink(missing_ok=True)
            self._held = False

    def _repair(self) -> None:
        """Cut a torn last line so that the next append starts on a fresh line."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            warnings.warn(f"{self.path}: torn last line ({len(data) - keep} bytes) dropped", stacklevel=3)
            f.truncate(keep)
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and make it durable before returning."""
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, keep: list[dict[str, Any]], stale: list[dict[str, Any]]) -> None:
        """Keep ``keep`` in cells.jsonl and append ``stale`` to cells.stale.jsonl (atomic replace)."""
        if stale:
            with open(self.dir / STALE, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in stale)
                f.flush()
                os.fsync(f.fileno())
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _alive(owner: str) -> bool:
    pid_text, _, host = owner.partition("@")
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
