"""The harness's own L∞ step loop for BIM and PGD: torchattacks' update, without a step on a decided image.

Written by hand because neither torchattacks nor ART can drop an image from its batch mid-attack. The update is
torchattacks' PGD/BIM step exactly (sign of the cross-entropy gradient, projection into the eps ball and
[0, 1]); what differs is the bookkeeping:

- a pool of at most ``runtime.batch`` images is attacked at a time; each image carries its own step counter,
  and a finished image is replaced by the next one waiting, so batches stay full;
- with ``runtime.early_stop``, an image leaves the pool at the first iterate the attacked model misclassifies
  (untargeted) or assigns to the target (targeted), and keeps that iterate: AutoAttack's rule, and never weaker
  than the last iterate for a deterministic model whose forward pass is the defended model's;
- with ``runtime.early_stop``, an image also leaves the pool, keeping its iterate, once its gradient is exactly
  zero (a rounding defense such as bit-depth squeezing or DQA, white-box): the sign step does not move it, so
  every later step of a deterministic model would recompute the same gradient at the same point and the run's
  result is that iterate; the steps it skips change nothing;
- a restart (a fresh random start) runs only for the images that survived all previous ones;
- an image's random start depends only on the cell's seed, its id (``runtime.ids``) and the restart, never on
  which other images share its batch, so the savings change no trajectory: they only end it sooner;
- with ``runtime.space`` (a threat that changes the attacked model's input per image, such as ``quantized``), the
  model gets ``space(iterate, image)``, which only a loop that knows each row's image can give it.

Besides the images, it reports ``late_loss_gain``: over the images that survived every step, the share of the
loss gain of their last run that came in its last 10 % of steps (Pintor et al. 2022: a loss still rising at the
end means the attack had not converged), for the ``unstable-loss`` red flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.base import Runtime
from bench.errors import Interrupted


def iterate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, *, eps: float,
            alpha: float, steps: int, random_start: bool, restarts: int, runtime: Runtime,
            decay: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Adversarial versions of ``x`` (on the CPU) and the loop's statistics; see the module docstring. Every step
    has size ``alpha``, or with ``decay`` step t (from 0) has ``alpha`` · (1 − t / steps)."""
    device = runtime.device
    n = len(x)
    out = x.clone()
    goal = y if target is None else target
    late = steps - max(1, steps // 10)
    first_loss = torch.zeros(n)
    late_loss = torch.zeros(n)
    last_loss = torch.full((n,), float("nan"))
    ids = runtime.ids if runtime.ids is not None else torch.arange(n)
    base = int(torch.randint(2**31, ()))
    waiting = [(i, 0) for i in range(n)]
    waiting.reverse()  # pop() from the end takes images in order
    idx = torch.zeros(0, dtype=torch.long)
    run = torch.zeros(0, dtype=torch.long)
    step = torch.zeros(0, dtype=torch.long)
    origin = x[:0].to(device)
    current = origin.clone()
    while waiting or len(idx):
        if runtime.should_stop():
            raise Interrupted
        room = runtime.batch - len(idx)
        if room > 0 and waiting:
            taken = [waiting.pop() for _ in range(min(room, len(waiting)))]
            new = torch.tensor([i for i, _ in taken], dtype=torch.long)
            start = x[new]
            if random_start:
                noise = torch.stack([_uniform(start.shape[1:], eps, base, int(ids[i]), r) for i, r in taken])
                start = (start + noise).clamp(0, 1)
            idx = torch.cat([idx, new])
            run = torch.cat([run, torch.tensor([r for _, r in taken], dtype=torch.long)])
            step = torch.cat([step, torch.zeros(len(new), dtype=torch.long)])
            origin = torch.cat([origin, x[new].to(device)])
            current = torch.cat([current, start.to(device)])
        current.requires_grad_(True)
        logits = model(current if runtime.space is None else runtime.space(current, origin))
        with torch.no_grad():
            pred = logits.argmax(1).cpu()
            per_image = F.cross_entropy(logits, goal[idx].to(device), reduction="none").cpu()
        loss = per_image if target is None else -per_image
        reached = pred != y[idx] if target is None else pred == target[idx]
        first_loss[idx[step == 0]] = loss[step == 0]
        late_loss[idx[step == late]] = loss[step == late]
        exhausted = step == steps
        done = exhausted | reached if runtime.early_stop else exhausted
        go = ~done
        stuck = torch.zeros_like(go)
        if go.any():
            signed = F.cross_entropy(logits[go.to(device)], goal[idx[go]].to(device), reduction="sum")
            (grad,) = torch.autograd.grad(signed if target is None else -signed, current)
            if runtime.early_stop:
                stuck = go & (grad.flatten(1) == 0).all(1).cpu()
                late_loss[idx[stuck & (step < late)]] = loss[stuck & (step < late)]
                go &= ~stuck
        current = current.detach()
        ended = done | stuck
        if ended.any():
            out[idx[ended]] = current[ended.to(device)].cpu()
            last_loss[idx[ended & reached]] = float("nan")
            last_loss[idx[ended & ~reached]] = loss[ended & ~reached]
            again = ended & ~reached & (run + 1 < restarts)
            waiting.extend(reversed([(int(i), int(r) + 1) for i, r in zip(idx[again], run[again], strict=True)]))
        if go.any():
            keep = go.to(device)
            rate = alpha * (1 - step[go].to(current.dtype) / steps).view(-1, *[1] * (current.dim() - 1)).to(device) \
                if decay else alpha
            stepped = current[keep] + rate * grad[keep].sign()
            delta = (stepped - origin[keep]).clamp(-eps, eps)
            current = (origin[keep] + delta).clamp(0, 1)
            origin = origin[keep]
        else:
            current, origin = current[:0], origin[:0]
        idx, run, step = idx[go], run[go], step[go] + 1
    survived = ~torch.isnan(last_loss)
    stats: dict[str, float] = {}
    if survived.any() and steps >= 10:
        total = (last_loss[survived] - first_loss[survived]).abs().sum()
        stats["late_loss_gain"] = round(float((last_loss[survived] - late_loss[survived]).sum() / total), 6) \
            if total > 0 else 0.0
    return out, stats


def _uniform(shape: torch.Size, eps: float, base: int, image: int, restart: int) -> torch.Tensor:
    """U(−eps, eps) noise of one image's random start, from its own seed."""
    generator = torch.Generator().manual_seed((base * 1_000_003 + image * 101 + restart) % 2**62)
    return torch.empty(shape).uniform_(-eps, eps, generator=generator)
