"""What every record carries about the code and machine that produced it."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

from bench import __version__


ROOT = Path(__file__).resolve().parent.parent


@cache
def git_revision(root: Path = ROOT) -> str | None:
    """The checkout's commit, with ``+dirty`` for uncommitted changes to tracked files outside folders named
    ``results`` (``results/``, ``examples/*/results/``), or None outside git. Results are outputs, not code:
    re-running a committed suite in place (or clearing its results first) does not mark the code that computes
    them as modified."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude,glob)**/results/**"]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


@cache
def stamp() -> dict[str, Any]:
    return {"version": __version__, "git": git_revision(), "torch": torch.__version__,
            "python": platform.python_version()}
