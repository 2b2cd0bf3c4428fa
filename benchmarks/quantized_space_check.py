"""Check a quantization defense's worst case with an attack the suites do not run: PGD in the quantized space.

    python benchmarks/quantized_space_check.py RESULTS_DIR DEFENSE EPS [--suite FILE] [--dataset D]
        [--limit N] [--restarts R] [--steps K] [--data-dir DIR] [--cache-dir DIR]

CQ and TQ quantize each pixel with a monotone function Q, so the classifier's inputs reachable from the L∞ ball of
radius EPS around an image x are exactly the box [Q(max(x − EPS, 0)), Q(min(x + EPS, 1))]. Sign-gradient PGD on
the classifier over that box (margin and cross-entropy losses, the first start at Q(x), the others random), mapped
back to pixels by bisection on Q, attacks the defended model without BPDA's gradient approximation. It is written
here because it needs the quantizer's inverse, which no attack library has. Each candidate is re-scored on the
defended model. The script prints this attack's accuracy, the harness's per-image worst case within EPS (the
leaderboard's rule, from RESULTS_DIR/cells.jsonl) and the images each one breaks that the other does not. It exits
1 if this attack breaks an image that the worst case counts as robust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.grid import expand
from bench.leaderboard import survivor_mask, within
from bench.provider import Models
from bench.results import read_records
from bench.settings import Settings, available_cores
from bench.suite import load_suite
from defenses.cq import QuantizationLayer


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Best other logit minus the true one: positive once the image is misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    return logits.scatter(1, y[:, None], float("-inf")).max(1).values - true


def invert(quant: torch.nn.Module, v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Pixels x' in [lo, hi] with Q(x') ≈ v, Q monotone per pixel: 40 bisection steps."""
    a, b = lo.clone(), hi.clone()
    for _ in range(40):
        m = (a + b) / 2
        below = quant(m) < v
        a, b = torch.where(below, m, a), torch.where(below, b, m)
    return (a + b) / 2


def attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, restarts: int,
           steps: int) -> torch.Tensor:
    """Per image: True when correct on the clean image and on every candidate the attack found."""
    quant, classifier = model.preprocess, model.classifier
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    with torch.no_grad():
        qlo, qhi, q0 = quant(lo), quant(hi), quant(x)
        robust = model(x).argmax(1) == y
    gen = torch.Generator().manual_seed(0)
    for restart in range(restarts):
        start = q0 if restart == 0 else qlo + (qhi - qlo) * torch.rand(x.shape, generator=gen)
        for loss in (margin, lambda logits, y: F.cross_entropy(logits, y, reduction="none")):
            v = start.clone()
            for step in range(steps):
                v.requires_grad_(True)
                grad, = torch.autograd.grad(loss(classifier(v), y).sum(), v)
                size = 0.2 * (1 - step / steps) + 0.01
                v = torch.minimum(torch.maximum(v.detach() + size * grad.sign(), qlo), qhi)
                if step % 10 == 9 or step == steps - 1:
                    with torch.no_grad():
                        candidate = invert(quant, v, lo, hi)
                        assert (candidate - x).abs().max() <= eps + 1e-6
                        robust &= model(candidate).argmax(1) == y
        print(f"  restart {restart + 1}/{restarts}: accuracy {robust.float().mean():.3f}", file=sys.stderr)
    return robust


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results directory of `bench run` (its cells.jsonl)")
    parser.add_argument("defense", help="the defense id as in the records, e.g. 'cq(n=2,z=50)'")
    parser.add_argument("eps", type=float, help="L∞ budget on the [0, 1] pixel scale")
    parser.add_argument("--suite", type=Path, help="the suite that made the results (default: suites/<its name>.toml)")
    parser.add_argument("--dataset", help="dataset of the records (default: the only one)")
    parser.add_argument("--limit", type=int, help="the first N of the evaluated images")
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data-dir")
    parser.add_argument("--cache-dir")
    args = parser.parse_args()
    torch.set_num_threads(available_cores())
    records = [r for r in read_records(args.results / "cells.jsonl") if r["error"] is None
               and r["defense"] == args.defense and (args.dataset is None or r["dataset"] == args.dataset)]
    if not records or len({r["dataset"] for r in records}) > 1:
        parser.error(f"{args.results}: need records of {args.defense} on exactly one dataset (see --dataset)")
    bounded = within(records, args.eps)
    if not bounded:
        parser.error(f"{args.results}: no cells of {args.defense} within L∞ {args.eps:g}")
    n = records[0]["n"]
    worst = survivor_mask(bounded)

    suite = load_suite(args.suite or Path("suites") / f"{records[0]['suite']}.toml")
    models = Models(Settings(data_dir=args.data_dir, cache_dir=args.cache_dir))
    cell = next((c for c in expand(suite) if c.dataset.value == records[0]["dataset"]
                 and models.defense(c).id == args.defense), None)
    if cell is None or not any(isinstance(m, QuantizationLayer) for m in models.defense(cell).preprocess().modules()):
        parser.error(f"{args.defense}: not a quantization defense of {suite.name}")
    model = models.model(cell).eval().requires_grad_(False)
    _, x, y = models.eval_set(cell)
    limit = min(args.limit or n, n)
    robust = torch.cat([attack(model, x[i:i + 500], y[i:i + 500], args.eps, args.restarts, args.steps)
                        for i in range(0, limit, 500)]).numpy()
    worst = worst[:limit]
    missed = int((worst & ~robust).sum())
    print(f"{args.defense} on {records[0]['dataset']}, L∞ eps {args.eps:g}, {limit} images:\n"
          f"  quantized-space PGD ({args.restarts} restarts × 2 losses × {args.steps} steps): {robust.mean():.1%}\n"
          f"  harness worst case over {len(bounded)} cells: {worst.mean():.1%}\n"
          f"  robust in the worst case, broken here: {missed}; broken there, robust here: "
          f"{int((~worst & robust).sum())}; both together: {np.mean(worst & robust):.1%}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
