"""The git field of every record: the commit, and whether the code (not the results) had uncommitted changes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.provenance import git_revision


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_dirty_means_changed_code_not_changed_results(tmp_path: Path) -> None:
    (tmp_path / "results" / "quick").mkdir(parents=True)
    (tmp_path / "examples" / "mine" / "results").mkdir(parents=True)
    (tmp_path / "bench.py").write_text("x = 1\n")
    (tmp_path / "results" / "quick" / "cells.jsonl").write_text("{}\n")
    (tmp_path / "examples" / "mine" / "results" / "cells.jsonl").write_text("{}\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "c")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert git_revision(tmp_path) == head
    (tmp_path / "results" / "quick" / "cells.jsonl").unlink()
    (tmp_path / "examples" / "mine" / "results" / "cells.jsonl").write_text("{}\n{}\n")
    git_revision.cache_clear()
    assert git_revision(tmp_path) == head
    (tmp_path / "bench.py").write_text("x = 2\n")
    git_revision.cache_clear()
    assert git_revision(tmp_path) == head + "+dirty"


def test_outside_git_there_is_no_revision(tmp_path: Path) -> None:
    assert git_revision(tmp_path) is None
