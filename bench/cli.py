"""The ``bench`` command line. Exit codes: 0 success, 1 some cells failed, 2 bad input (one line, no
traceback), 130 interrupted by Ctrl-C."""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import __version__
from bench.errors import BenchError

if TYPE_CHECKING:
    from bench.settings import Settings
    from bench.suite import Suite

Command = Callable[[argparse.Namespace], int]


def _keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse. By default it hands every freed block above its (adaptive) mmap
    threshold back to the OS, so each forward/backward pass page-faults its activation buffers back in: 8-13 % of
    an attack's time went to the kernel (see results/perf.md). Nothing to do where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: the largest glibc accepts; attack batches stay below it
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap instead of returning it


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def _device(choice: str | None) -> str:
    """``--device``: a torch device of a known type that can hold a tensor here (checked now, not per cell)."""
    import torch

    if not choice:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise BenchError(f"--device {choice}: expected a torch device such as cpu, cuda or cuda:1 "
                         f"(types: {', '.join(DEVICE_TYPES)})")
    if device.type == "cuda":  # checked without creating a CUDA context (Ray cells run elsewhere)
        if not torch.cuda.is_available():
            raise BenchError(f"--device {choice}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {choice}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return choice
    try:
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise BenchError(f"--device {choice}: cannot be used here ({str(exc).splitlines()[0]})") from None
    return choice


def _cache_dir(arg: str | None) -> str | None:
    """The model cache (--cache-dir, $BENCH_CACHE_DIR or the default) must be a directory or creatable; it may be
    read-only when it already holds every model."""
    from bench.train import default_cache_dir

    path = Path(arg).expanduser() if arg else default_cache_dir()
    source = "--cache-dir" if arg else "BENCH_CACHE_DIR" if os.environ.get("BENCH_CACHE_DIR") else "model cache"
    if path.exists() and not path.is_dir():
        raise BenchError(f"{source} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"{source} {path}: cannot be created ({exc.strerror or exc})") from None
    return arg


def _output_file(text: str, flag: str, *, make_parent: bool = False) -> Path:
    """A file named on the command line for writing: not a directory, in a writable directory (created first
    with ``make_parent``). Checked before the work that produces it."""
    path = Path(text)
    if path.is_dir():
        raise BenchError(f"{flag} {text}: is a directory; expected a file name")
    if make_parent:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BenchError(f"{flag} {text}: cannot create {path.parent} ({exc.strerror or exc})") from None
    if not path.parent.is_dir():
        raise BenchError(f"{flag} {text}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise BenchError(f"{flag} {text}: directory {path.parent} is not writable")
    return path


RAY_FLAGS = ("address", "cpus_per_cell", "gpus_per_cell")


def _data_dir(arg: str | None) -> str | None:
    """An explicitly named data directory (--data-dir or $BENCH_DATA_DIR) must exist."""
    named = arg or os.environ.get("BENCH_DATA_DIR")
    if named and not Path(named).expanduser().is_dir():
        source = "--data-dir" if arg else "BENCH_DATA_DIR"
        raise BenchError(f"data directory {named} ({source}) does not exist; it should hold mnist/ and/or "
                         f"cifar-10-batches-py/")
    return named


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from bench.results import prepare_dir
    from bench.runner import default_out, run
    from bench.settings import Settings, available_cores
    from bench.suite import load_suite

    suite = load_suite(args.suite)
    ray = {name: getattr(args, name) for name in RAY_FLAGS if getattr(args, name) is not None}
    if ray and args.executor != "ray":
        flag = "--" + next(iter(ray)).replace("_", "-")
        raise BenchError(f"{flag} applies to --executor ray only; add --executor ray or leave it out")
    settings = Settings(data_dir=_data_dir(args.data_dir), cache_dir=_cache_dir(args.cache_dir),
                        device=_device(args.device), strict_data=args.strict_data)
    executor = None
    if args.executor == "ray":
        from bench.ray_executor import RayExecutor

        executor = RayExecutor(**ray)
    torch.set_num_threads(available_cores())
    if args.dry_run:
        from bench.estimate import estimate
        from bench.evaluate import Context
        from bench.grid import select
        from bench.runner import plan

        cells = plan(suite, args.limit)
        print(estimate(select(cells, args.only) if args.only else cells, Context(settings)).describe())
        return 0
    if args.no_progress:  # also the training and substitute bars, here and in Ray workers
        os.environ["BENCH_NO_PROGRESS"] = "1"
    if args.train_only:
        return _train_only(args, suite, settings)
    out = Path(args.out) if args.out else default_out(suite, args.limit)
    prepare_dir(out)
    _keep_freed_memory()
    summary = run(suite, out, settings, limit=args.limit, fresh=args.fresh, executor=executor,
                  progress=not args.no_progress, only=args.only)
    print(summary.describe())
    for error in summary.errors:
        print(f"  failed: {error}", file=sys.stderr)
    print(f"leaderboard: {out / 'leaderboard.md'}")
    return summary.exit_code


def _train_only(args: argparse.Namespace, suite: Suite, settings: Settings) -> int:
    from bench.errors import Interrupted
    from bench.runner import train_only

    if args.executor != "local" or args.out:
        raise BenchError(f"--train-only trains in this process into the model cache; leave out "
                         f"{'--executor' if args.executor != 'local' else '--out'}")
    start = time.perf_counter()
    try:
        trained = train_only(suite, settings, limit=args.limit, only=args.only, fresh=args.fresh,
                             report=lambda line: print(line, flush=True))
    except Interrupted:
        print("bench: interrupted: the models trained so far stay cached and a training stopped part-way resumes "
              "where it stopped; run again to go on", file=sys.stderr)
        return 130
    print(f"{trained} trained in {time.perf_counter() - start:.0f} s, the others cached; the same command without "
          f"--train-only runs the cells")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from bench.data import FILES, SUBDIR, resolve_dir
    from bench.evaluate import Context
    from bench.settings import Settings
    from bench.grid import expand
    from bench.runner import check_data
    from bench.suite import load_suite

    suite = load_suite(args.suite)
    cells = expand(suite)
    named = _data_dir(args.data_dir)
    root = resolve_dir(named)
    ctx = Context(Settings(data_dir=named))
    for dataset in suite.datasets:
        missing = [f for f in FILES[dataset] if not (root / SUBDIR[dataset] / f).is_file()]
        if missing and named:
            raise BenchError(f"{dataset.value} files missing in {root / SUBDIR[dataset]}: {', '.join(missing)}")
        if missing:
            print(f"note: {dataset.value} files are not in {root} yet; bench run will try to download them")
        else:
            check_data([c for c in cells if c.dataset is dataset], ctx)
    print(f"{suite.source}: ok — suite {suite.name!r}: {len(suite.datasets)} dataset(s), {len(suite.defenses)} "
          f"defense(s), {len(suite.attacks)} attack(s), {len(cells)} cells")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from bench import plugins
    from bench.attacks import REGISTRY as ATTACKS
    from bench.registry import fmt_value
    from bench.suite import load_suite
    from defenses import REGISTRY as DEFENSES

    for suite in args.suite or []:
        load_suite(suite)
    plugins.activate(plugins.plugin_location(p, Path.cwd()) for p in args.plugin or [])
    for title, registry in (("Defenses", DEFENSES), ("Attacks", ATTACKS)):
        print(f"{title}\n")
        for cls in registry:
            traits = []
            if title == "Attacks":
                traits = [cls.norm, "eps grid" if cls.bounded else "minimum-norm",
                          "gradient" if cls.gradient else "gradient-free"]
            elif cls.bpda_variants:
                traits = ["bpda backward: " + "/".join(cls.bpda_variants)]
            origin = registry.origin(cls.name)
            if origin != "built-in":
                traits.append(origin)
            print(f"  {cls.name}: {cls.summary()}" + (f"  [{', '.join(traits)}]" if traits else ""))
            rows = [[p.name, fmt_value(p.default) if not hasattr(p.default, "mnist") else str(p.default),
                     p.describe(), p.doc] for p in cls.params]
            if rows:
                table = tabulate(rows, headers=["parameter", "default", "accepts", "meaning"], tablefmt="simple",
                                 maxcolwidths=[None, 18, 30, 60])
                print("\n".join("    " + line for line in table.splitlines()))
            print()
    from bench.threats import REGISTRY as THREATS

    print("Threat models (attack entries' `threat`; settings in the suite table of the same name)\n")
    for cls in THREATS:
        origin = THREATS.origin(cls.name)
        print(f"  {cls.name} ({cls.short}): {cls.summary()}" + (f"  [{origin}]" if origin != "built-in" else ""))
        for p in cls.params:
            print(f"    {p.name} = {fmt_value(p.default)}: {p.describe()}; {p.doc}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench import leaderboard

    out = Path(args.dir)
    if not (out / "cells.jsonl").is_file():
        raise BenchError(f"{out / 'cells.jsonl'} does not exist: run a suite into {out} first")
    path = leaderboard.write(out)
    print(f"wrote {path} and {out / 'cells.csv'}")
    return 0


def cmd_resilience(args: argparse.Namespace) -> int:
    import torch

    from bench.evaluate import Context
    from bench.resilience import analyse, default_train, render, undefended_cell
    from bench.settings import Settings, available_cores
    from bench.suite import RESILIENCE_PARAMS, load_suite
    from bench.types import Dataset

    dataset = Dataset(args.dataset)
    if args.max_levels < 2:
        raise BenchError(f"--max-levels {args.max_levels}: expected an integer ≥ 2")
    settings = {p.name: p.default for p in RESILIENCE_PARAMS}
    train, seed = default_train(dataset), 0
    if args.suite:
        suite = load_suite(args.suite)
        if dataset not in suite.datasets:
            raise BenchError(f"{args.suite}: has no [datasets.{dataset.value}] table")
        train, seed, settings = suite.datasets[dataset].train, suite.seed, dict(suite.resilience)
    for p in RESILIENCE_PARAMS:
        if getattr(args, p.name) is not None:
            settings[p.name] = p.check(getattr(args, p.name), "<arguments>", f"--{p.name}")
    torch.set_num_threads(available_cores())
    ctx = Context(Settings(data_dir=_data_dir(args.data_dir), cache_dir=_cache_dir(args.cache_dir),
                           device=_device(args.device)))
    analysis = analyse(ctx.models, undefended_cell(dataset, train, seed), settings["eps"], settings["noise"],
                       settings["tolerance"], images=args.n, max_levels=args.max_levels)
    print(render(analysis))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from bench import flags
    from bench.leaderboard import last_records
    from bench.results import check_compatible, read_records

    path = Path(args.dir) / "cells.jsonl"
    if not path.is_file():
        raise BenchError(f"{path} does not exist: run a suite into {args.dir} first")
    records = read_records(path)
    check_compatible(last_records(records), str(path))
    raised = flags.compute(records)
    if not raised:
        print(f"no red flags in {len(records)} cells")
        return 0
    for flag in raised:
        print(f"{flag.dataset} {flag.defense} [{flag.code}] {flag.evidence}")
    print(f"{len(raised)} red flag(s); see docs/flags.md")
    return 0


def cmd_perf(args: argparse.Namespace) -> int:
    import torch

    from bench import perf
    from bench.settings import Settings, available_cores
    from bench.types import Dataset

    out = _output_file(args.out, "--out", make_parent=True)
    only = tuple(args.attacks.split(",")) if args.attacks else ()
    unknown = sorted(set(only) - set(perf.ATTACKS))
    if unknown:
        raise BenchError(f"--attacks {args.attacks}: unknown {', '.join(unknown)}; expected some of "
                         f"{', '.join(perf.ATTACKS)}")
    settings = Settings(data_dir=_data_dir(args.data_dir), cache_dir=_cache_dir(args.cache_dir),
                        device=_device(args.device), batch=args.batch)
    torch.set_num_threads(args.threads or available_cores())
    _keep_freed_memory()
    rows, facts = perf.measure(Dataset(args.dataset), settings, args.images, args.repeats, only)
    command = " ".join(["bench perf", f"--dataset {args.dataset}", f"--images {args.images}",
                        f"--repeats {args.repeats}", *([f"--batch {args.batch}"] if args.batch else []),
                        *([f"--attacks {args.attacks}"] if args.attacks else []),
                        *([f"--threads {args.threads}"] if args.threads else [])])
    block = perf.render(rows, facts, command)
    print(block)
    perf.write(out, block)
    print(f"wrote {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from bench.compare import compare, load_dir, load_reference

    reference = load_reference(args.reference)
    drifts = compare(load_dir(args.dir), reference, args.clean_tol, args.robust_tol)
    for drift in drifts:
        print(f"DRIFT {drift.cell}: {drift.problem}")
    print(f"{len(reference) - len({d.cell for d in drifts})}/{len(reference)} reference cells match "
          f"(clean ±{100 * args.clean_tol:g}, robust ±{100 * args.robust_tol:g} points)")
    return 1 if drifts else 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench import report
    from bench.leaderboard import planned
    from bench.results import read_records, write_text

    out = _output_file(args.out, "--out")
    records: list[dict[str, Any]] = []
    grids: dict[str, tuple[int, int | None] | None] = {}
    for directory in args.dirs:
        path = Path(directory) / "cells.jsonl"
        if not path.is_file():
            warnings.warn(f"{path} does not exist: {directory} is reported as not run", stacklevel=1)
            grids[directory] = None
            continue
        found = read_records(path)
        plan = planned(Path(directory))
        done = {r["cell_id"] for r in found}
        grids[directory] = (len(done & plan), len(plan)) if plan else (len(done), None)
        records += found
    if all(counts is None for counts in grids.values()):
        raise BenchError(f"no results in {', '.join(args.dirs)}: run the paper suites first "
                         f"(bench run suites/paper-mnist.toml)")
    write_text(out, report.render(records, grids))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Benchmark preprocessing defenses against "
                                     "adversarial examples, with adaptive attacks.")
    parser.add_argument("--version", action="version", version=f"qusec-bench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a suite's whole grid (resumes by default)")
    run.add_argument("suite", help="suite file (TOML)")
    run.add_argument("--out", help="results directory (default: results/<suite name>)")
    run.add_argument("--data-dir", help="dataset directory (default: $BENCH_DATA_DIR, else ~/.cache/qusec-bench/data)")
    run.add_argument("--cache-dir", help="trained-model cache (default: $BENCH_CACHE_DIR, else "
                     "~/.cache/qusec-bench/models)")
    run.add_argument("--limit", type=_positive_int, help="evaluate only the first N test images of each dataset")
    run.add_argument("--fresh", action="store_true", help="recompute every cell and retrain the models it uses")
    run.add_argument("--only", action="append", metavar="FIELD=PATTERN[,PATTERN...]",
                     help="run only the cells whose FIELD (dataset, defense, attack, threat or eps) matches a "
                     "pattern (shell wildcards, name or id as in the tables: defense=tq, 'defense=cq(n=2*', "
                     "'defense=cq(n=2,z=50)', threat=wb, eps=0.1,0.3); repeat to narrow further; the other cells "
                     "stay in the plan and the leaderboard, so slices fill the same results directory")
    stage = run.add_mutually_exclusive_group()
    stage.add_argument("--dry-run", action="store_true", help="plan only: print the cells, the models to train and "
                       "an estimated wall time from a short throughput probe on the device; run nothing")
    stage.add_argument("--train-only", action="store_true", help="train into the model cache every model and "
                       "substitute the selected cells need (with --fresh, again), one line and its time each, and "
                       "run no cell: a later run of the same cells, here or on a machine sharing the cache, only "
                       "attacks")
    run.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--strict-data", action="store_true", help="refuse data files that differ from the official "
                     "release instead of using them with a warning")
    run.add_argument("--executor", choices=("local", "ray"), default="local", help="where cells run (default: local)")
    run.add_argument("--address", help="Ray cluster address ('auto' or ray://host:port); default: embedded local Ray")
    run.add_argument("--cpus-per-cell", type=_positive_float, help="Ray CPUs per cell task (default 1)")
    run.add_argument("--gpus-per-cell", type=_nonnegative_float, help="Ray GPUs per cell task (default 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a suite without running it")
    check.add_argument("suite")
    check.add_argument("--data-dir")
    check.set_defaults(func=cmd_check)

    lst = sub.add_parser("list", help="list defenses and attacks with their parameters and defaults")
    lst.add_argument("--suite", action="append", metavar="SUITE",
                     help="also list the plug-ins this suite loads (repeatable)")
    lst.add_argument("--plugin", action="append", metavar="PLUGIN",
                     help="also list the classes of this plug-in: a .py file or a dotted module (repeatable)")
    lst.set_defaults(func=cmd_list)

    board = sub.add_parser("leaderboard", help="re-render DIR/leaderboard.md and DIR/cells.csv from DIR/cells.jsonl")
    board.add_argument("dir")
    board.set_defaults(func=cmd_leaderboard)

    res = sub.add_parser("resilience", help="error-resilience analysis: noise tolerance of the undefended CNN and "
                         "the recommended quantization levels n")
    res.add_argument("--dataset", choices=("mnist", "cifar10"), required=True)
    res.add_argument("--eps", type=_positive_float, help="attack budget the levels must absorb (default 0.3)")
    res.add_argument("--noise", choices=("uniform", "gaussian"), help="injected noise (default uniform)")
    res.add_argument("--tolerance", type=_nonnegative_float, help="tolerated accuracy loss (default 0.01)")
    res.add_argument("--suite", help="take training settings, seed and [resilience] defaults from this suite")
    res.add_argument("--n", type=_positive_int, default=1000, help="first N test images (default 1000)")
    res.add_argument("--max-levels", type=_positive_int, default=16, help="largest n considered (default 16)")
    res.add_argument("--data-dir", help="dataset directory (default: $BENCH_DATA_DIR, else ~/.cache/qusec-bench/data)")
    res.add_argument("--cache-dir", help="trained-model cache (default: $BENCH_CACHE_DIR, else "
                     "~/.cache/qusec-bench/models)")
    res.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    res.set_defaults(func=cmd_resilience)

    audit = sub.add_parser("audit", help="print the evaluation red flags of DIR/cells.jsonl with their evidence")
    audit.add_argument("dir")
    audit.set_defaults(func=cmd_audit)

    rep = sub.add_parser("report", help="write the claim-by-claim QuSecNets reproduction report from stored cells")
    rep.add_argument("dirs", nargs="*", default=["results/paper-mnist", "results/paper-cifar10"],
                     help="results directories (default: results/paper-mnist results/paper-cifar10)")
    rep.add_argument("--out", default="results/REPRODUCTION.md", help="report file (default: results/REPRODUCTION.md)")
    rep.set_defaults(func=cmd_report)

    prf = sub.add_parser("perf", help="measure attack throughput: harness vs the model's speed limit, torchattacks "
                         "and ART (writes results/perf.md)")
    prf.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    prf.add_argument("--images", type=_positive_int, default=1000, help="test images per attack (default 1000; "
                     "at most 50 for JSMA and ART's C&W, 20 for torchattacks' JSMA, 10 for ART's C&W at batch 1)")
    prf.add_argument("--batch", type=_positive_int, help="attack batch of the harness and the "
                     "libraries (default: the harness's own choice, bench.craft.attack_batch)")
    prf.add_argument("--repeats", type=_positive_int, default=3, help="runs per measurement (default 3)")
    prf.add_argument("--attacks", help="comma-separated subset of fgsm,bim,pgd,cw_l2,jsma (default: all)")
    prf.add_argument("--threads", type=_positive_int, help="torch threads (default: the available cores)")
    prf.add_argument("--out", default="results/perf.md", help="file whose measured block is replaced "
                     "(default: results/perf.md)")
    prf.add_argument("--data-dir")
    prf.add_argument("--cache-dir")
    prf.add_argument("--device")
    prf.set_defaults(func=cmd_perf)

    compare = sub.add_parser("compare", help="check DIR's cells against REFERENCE's within tolerances "
                             "(exit 1 on drift)")
    compare.add_argument("dir")
    compare.add_argument("reference")
    compare.add_argument("--clean-tol", type=_nonnegative_float, default=0.01, help="clean accuracy tolerance "
                         "(fraction, default 0.01)")
    compare.add_argument("--robust-tol", type=_nonnegative_float, default=0.03, help="robust accuracy tolerance "
                         "(fraction, default 0.03)")
    compare.set_defaults(func=cmd_compare)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _warning_line(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    return f"bench: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _warning_line  # type: ignore[assignment]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        print(f"bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
