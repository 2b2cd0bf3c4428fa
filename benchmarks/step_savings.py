"""What "no step on a decided image" saves: one suite's grid with the step savings on and off, in one process.

    python benchmarks/step_savings.py [SUITE] [--limit N] [--data-dir DIR] [--cache-dir DIR]
    (default: suites/quick.toml)

Trains (or loads) the suite's models first, then runs every cell twice into temporary directories: with the
savings (attacks skip clean-misclassified images, BIM/PGD drop an image at its first adversarial iterate, restarts
and ensemble stages run only on survivors) and without (every attempt takes every step). Prints, per cell and in
total, the gradient steps (in the total, a crafting that several cells share — oblivious, black-box — counts once:
the steps the run took), the attack seconds and the robust accuracy of both; exits 1 if any cell's robust
accuracy with the savings is more than 0.5 points above the one without (the savings may only end an attack
sooner, never weaken it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from bench.evaluate import Context
from bench.executors import LocalExecutor
from bench.results import read_records
from bench.runner import plan, run
from bench.settings import Settings, available_cores
from bench.suite import load_suite

TOLERANCE = 0.005


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", nargs="?", default="suites/quick.toml")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    torch.set_num_threads(available_cores())
    suite = load_suite(args.suite)
    base = Settings(data_dir=args.data_dir, cache_dir=args.cache_dir)
    warm = Context(base)
    for cell in plan(suite, args.limit):  # train first, so that neither timed run pays for it
        warm.models.model(cell)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for save in (True, False):
            settings = Settings(data_dir=args.data_dir, cache_dir=args.cache_dir, save_steps=save, reuse_crafted=False)
            ctx = Context(settings)
            start = time.perf_counter()
            run(suite, Path(tmp) / str(save), settings, limit=args.limit, executor=LocalExecutor(ctx), progress=False)
            records = {r["cell_id"]: r for r in read_records(Path(tmp) / str(save) / "cells.jsonl")
                       if r.get("same_as") is None}
            taken = sum(r["gradients"] for r in records.values() if not r["shared_crafting"])
            results[save] = (time.perf_counter() - start, records,
                             taken + sum(crafted.backwards for crafted in ctx.craftings()))
    (wall_on, on, steps_on), (wall_off, off, steps_off) = results[True], results[False]
    rows, worse = [], []
    for key, r in on.items():
        o = off[key]
        rows.append([r["defense"], f"{r['attack']} {r['threat_label']} {r['eps']}", r["gradients"], o["gradients"],
                     f"{r['attack_seconds']:.1f}", f"{o['attack_seconds']:.1f}", f"{100 * r['robust_acc']:.1f}",
                     f"{100 * o['robust_acc']:.1f}"])
        if r["robust_acc"] > o["robust_acc"] + TOLERANCE:
            worse.append(rows[-1][:2])
    seconds_on = sum(r["attack_seconds"] for r in on.values())
    seconds_off = sum(r["attack_seconds"] for r in off.values())
    rows.append(["total", f"{len(on)} computed cells", steps_on, steps_off, f"{seconds_on:.1f}", f"{seconds_off:.1f}",
                 "", ""])
    print(tabulate(rows, headers=["defense", "cell", "gradients on", "off", "attack s on", "off", "robust % on",
                                  "off"], tablefmt="github"))
    print(f"\n{args.suite}{f' --limit {args.limit}' if args.limit else ''}: gradient steps on ÷ off = "
          f"{steps_on / steps_off:.3f}; attack seconds on ÷ off = {seconds_on / seconds_off:.3f}; whole runs "
          f"{wall_on:.0f} s vs {wall_off:.0f} s; {available_cores()} cores, torch {torch.__version__}")
    if worse:
        print(f"robust accuracy higher with the savings in {len(worse)} cell(s): {worse}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
