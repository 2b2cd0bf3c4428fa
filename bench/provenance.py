"""What every record carries about the code and machine that produced it."""

from __future__ import annotations

import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

from bench import __version__


@cache
def git_revision() -> str | None:
    """The harness checkout's commit (with ``+dirty`` for uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


@cache
def stamp() -> dict[str, Any]:
    return {"version": __version__, "git": git_revision(), "torch": torch.__version__,
            "python": platform.python_version()}
