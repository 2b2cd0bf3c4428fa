"""Peak resident memory and wall time of ``bench run`` on suites, each in a fresh process.

    python benchmarks/peak_rss.py [SUITE ...]   (default: suites/regression.toml benchmarks/cifar-cw.toml)

Each suite runs with ``--fresh`` into a temporary results directory and a temporary model cache, so the figures
include training. Prints one line per suite; exits 1 if a run fails or exceeds ``--limit-gib`` (default 4).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

DEFAULT = ("suites/regression.toml", "benchmarks/cifar-cw.toml")


def measure(suite: str, limit_gib: float) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "bench.cli", "run", suite, "--out", f"{tmp}/out", "--cache-dir",
                                 f"{tmp}/cache", "--fresh", "--no-progress"], capture_output=True, text=True)
        wall = time.perf_counter() - start
    # ru_maxrss of RUSAGE_CHILDREN is the largest peak of any waited-for child (kB on Linux): run one suite per
    # process of this script to keep the figures separate.
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    ok = result.returncode == 0 and peak_gib < limit_gib
    print(f"{suite}: peak RSS {peak_gib:.2f} GiB, wall {wall:.0f} s, exit {result.returncode}"
          f"{'' if ok else '  <-- FAILED'}")
    if result.returncode:
        print(result.stderr[-2000:], file=sys.stderr)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=list(DEFAULT))
    parser.add_argument("--limit-gib", type=float, default=4.0)
    args = parser.parse_args()
    if len(args.suites) > 1:
        results = [subprocess.run([sys.executable, __file__, suite, "--limit-gib", str(args.limit_gib)]).returncode
                   for suite in args.suites]
        return 1 if any(results) else 0
    return 0 if measure(args.suites[0], args.limit_gib) else 1


if __name__ == "__main__":
    sys.exit(main())
