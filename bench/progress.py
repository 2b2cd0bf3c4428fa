"""Progress bars: live in a terminal, a line every 30 s in logs (CI), off with ``BENCH_NO_PROGRESS=1``."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def bar(**kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    if os.environ.get("BENCH_NO_PROGRESS"):
        kwargs["disable"] = True
    return tqdm(**kwargs)
