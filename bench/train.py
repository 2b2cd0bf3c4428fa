"""Seeded, deterministic training and the cache of trained weights.

The cache key holds everything that changes the weights: dataset and the md5 of its files, architecture, the
defense's weight-relevant parameters, training settings and seed. Weights are saved as a state dict (atomic
rename) and loaded with ``weights_only=True``; a corrupt file is moved aside and the model retrained. A file lock
per key makes concurrent processes (local ``--jobs`` or Ray workers) wait for one training instead of repeating it.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bench import __version__
from bench.errors import BenchError, Interrupted
from bench.progress import bar as progress_bar
from bench.results import write_bytes

BatchHook = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (model, x, y, progress=fraction done) -> (x, y)
StepHook = Callable[[nn.Module], None]

# Bumped when a change to the training code changes the weights it produces, so old cache entries are not reused.
# 2: the training progress handed to batch hooks came from the progress bar, which stays at 0 when bars are off
# (--no-progress, BENCH_NO_PROGRESS): adversarial training (advtrain, dqa adv_train="pgd") never left its eps
# warm-up and trained on clean images.
TRAIN_CODE_VERSION = 2

# CPU training runs on this many intra-op threads whatever the machine: the thread count sets the order of float
# sums in the convolutions, so the weights depend on it (measured: 1 and 2 threads train different MNIST CNNs from
# the same seed; 2 threads give the same weights on one core under ``taskset`` as on two, no slower than 1).
# Fixed, a model lost from the cache is retrained to the same weights, which the cells already computed on it
# need (the runner recomputes cells whose weights differ from the cached model's).
TRAIN_THREADS = 2

# A training in progress is saved at a batch boundary this often (seconds) and when it is stopped (Ctrl-C): a killed
# or interrupted run goes on from the last save, to the same weights as an uninterrupted one (the CIFAR-10
# PGD-trained models take hours on a CPU, longer than many sessions or preemptible jobs last).
CHECKPOINT_SECONDS = 300.0
PARTIAL_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """How a classifier is trained (suite table ``[datasets.<name>]``; see README "Suite files")."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    loss: str = "ce"
    augment: bool = False
    train_limit: int = 0
    optimizer: str = "adam"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        return replace(self, **overrides)


def loss_fn(name: str, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``ce``: cross-entropy; ``mse``: squared error between softmax and one-hot label (QuSecNets eq. 2).

    ``label_smoothing`` ε replaces the one-hot target by ``(1 - ε)·one_hot + ε/classes`` in both (for ``ce`` this
    is ``F.cross_entropy(..., label_smoothing=ε)``)."""
    if name == "mse":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / logits.shape[1]
        return (logits.softmax(1) - target).pow(2).sum(1).mean()
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def flip_crop(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and random crop after zero-padding by ``pad`` pixels (standard CIFAR augmentation).

    The draws come from the CPU ``generator`` whatever ``x``'s device, so a GPU run flips and crops as a CPU run
    does; the flip and the gather run where ``x`` is (on a GPU, no CPU time per image)."""
    n, _, h, w = x.shape
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


# One-cycle shape of torch.optim.lr_scheduler.OneCycleLR's defaults (Smith & Topin 2017): from lr/25 up to lr over
# the first 30 % of the steps, then down to lr/25e4, both halves cosine. Momentum is not cycled.
ONECYCLE_RISE, ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 0.3, 25.0, 1e4


def _cos_between(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def _lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the configured lr at optimiser step ``step`` of ``total``."""
    if schedule == "onecycle":
        peak = ONECYCLE_RISE * total - 1
        low = 1 / ONECYCLE_DIV
        if step <= peak:
            return _cos_between(low, 1.0, step / peak) if peak > 0 else 1.0
        return _cos_between(1.0, low / ONECYCLE_FINAL_DIV, min(1.0, (step - peak) / (total - 1 - peak)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "step":
        return 0.1 ** (int(step >= 0.5 * total) + int(step >= 0.75 * total))
    return 1.0


def make_optimiser(cfg: TrainConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int, *,
        batch_hook: BatchHook | None = None, step_hook: StepHook | None = None, device: str = "cpu",
        desc: str = "train", should_stop: Callable[[], bool] | None = None,
        checkpoint: Path | None = None) -> None:
    """Train ``model`` in place on (x, y) with ``cfg.optimizer`` (Adam, AdamW, or SGD with Nesterov momentum 0.9);
    the shuffling and every random draw follow ``seed``.

    ``should_stop`` is polled between batches; when it returns True, :class:`~bench.errors.Interrupted` is raised.
    On the CPU it runs on ``TRAIN_THREADS`` threads. With ``checkpoint``, the whole training state (weights,
    optimiser, schedule, the shuffling generator, torch's global RNG that batch hooks draw from, the position) is
    written there every ``CHECKPOINT_SECONDS`` and when stopped, and a training that finds it goes on from it.
    Hand-written: a resume must give the weights of an uninterrupted run, so every random state and the
    mid-epoch position are saved, which torch's and Lightning's checkpoints leave to the caller.
    """
    threads = torch.get_num_threads()
    if not str(device).startswith("cuda"):
        torch.set_num_threads(TRAIN_THREADS)
    try:
        _fit(model, x, y, cfg, seed, batch_hook, step_hook, device, desc, should_stop, checkpoint)
    finally:
        torch.set_num_threads(threads)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int,
         batch_hook: BatchHook | None, step_hook: StepHook | None, device: str, desc: str,
         should_stop: Callable[[], bool] | None, checkpoint: Path | None) -> None:
    if cfg.train_limit:
        x, y = x[:cfg.train_limit], y[:cfg.train_limit]
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimiser = make_optimiser(cfg, model.parameters())
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(cfg.lr_schedule, s, total))
    identity = {"cfg": asdict(cfg), "seed": seed, "images": len(x), **_runtime(device)}
    partial = _Partial(checkpoint, identity, total, model, optimiser, scheduler, generator)
    first_epoch, first_i, step, order = partial.resume(desc)
    with progress_bar(total=total, initial=step, desc=desc, unit="batch", leave=False) as bar:
        for epoch in range(first_epoch, cfg.epochs):
            if order is None:
                order = torch.randperm(len(x), generator=generator)
            for i in range(first_i, len(x), cfg.batch_size):
                if should_stop is not None and should_stop():
                    partial.save(epoch, i, step, order)
                    raise Interrupted
                index = order[i:i + cfg.batch_size]
                xb, yb = x[index].to(device), y[index].to(device)
                if cfg.augment:
                    xb = flip_crop(xb, generator)
                if batch_hook is not None:
                    xb, yb = batch_hook(model, xb, yb, progress=step / total)
                    model.train()
                loss = loss_fn(cfg.loss, model(xb), yb, cfg.label_smoothing)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                scheduler.step()
                if step_hook is not None:
                    step_hook(model)
                step += 1
                bar.update()
                if not bar.disable:  # loss.item() waits for the device: only for a bar that shows it
                    bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}", refresh=False)
                partial.save(epoch, i + cfg.batch_size, step, order, due=True)
            order, first_i = None, 0
    model.eval()


class _Partial:
    """The saved state of one training in progress (``fit``'s ``checkpoint``); inert without a path."""

    def __init__(self, path: Path | None, identity: dict[str, Any], total: int, model: nn.Module,
                 optimiser: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 generator: torch.Generator) -> None:
        self.path, self.identity, self.total = path, identity, total
        self.model, self.optimiser, self.scheduler, self.generator = model, optimiser, scheduler, generator
        self.cuda = identity["device"] == "cuda"
        self.saved = time.monotonic()

    def save(self, epoch: int, next_i: int, step: int, order: torch.Tensor, due: bool = False) -> None:
        """Write the state before batch ``next_i`` of ``epoch`` (``due``: only when CHECKPOINT_SECONDS have passed)."""
        if self.path is None or (due and time.monotonic() - self.saved < CHECKPOINT_SECONDS):
            return
        state = {"format": PARTIAL_FORMAT, "identity": self.identity, "epoch": epoch, "next": next_i,
                 "step": step, "total": self.total, "order": order, **self._state()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(self.path, buffer.getvalue())
        self.saved = time.monotonic()

    def _state(self) -> dict[str, Any]:
        """Everything the rest of the training depends on besides the position (the live tensors: copy to keep)."""
        return {"model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(), "generator": self.generator.get_state(),
                "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if self.cuda else None}

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        if self.cuda:
            torch.cuda.set_rng_state(state["cuda_rng"])

    def resume(self, desc: str) -> tuple[int, int, int, torch.Tensor | None]:
        """(epoch, batch offset, step, that epoch's order) to start from: a saved state of this very training
        restored into the model, optimiser, schedule and generators, else the start (a state that cannot be used
        is said and ignored)."""
        if self.path is None or not self.path.is_file():
            return 0, 0, 0, None
        start = copy.deepcopy(self._state())
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("format") != PARTIAL_FORMAT or state.get("identity") != self.identity:
                raise ValueError("it belongs to another training (settings, device, torch or format differ)")
            self._restore(state)
        except Exception as exc:  # noqa: BLE001 - any unusable state means training from the start, never a crash
            self._restore(start)
            warnings.warn(f"{self.path}: saved training state not used ({type(exc).__name__}: {exc}); training "
                          f"from the start", stacklevel=4)
            return 0, 0, 0, None
        tqdm.write(f"{desc}: resuming at batch {state['step']} of {self.total} from {self.path.name}", file=sys.stderr)
        return state["epoch"], state["next"], state["step"], state["order"]


def _runtime(device: str) -> dict[str, Any]:
    """The part of a training's identity that the machine sets: the same settings on another device, torch or
    thread count sum floats differently, so a saved state of one is not resumed by another."""
    return {"device": torch.device(device).type, "torch": str(torch.__version__), "threads": TRAIN_THREADS}


def cache_key(fields: dict[str, Any]) -> str:
    """Stable 16-hex-digit hash of the JSON of ``fields``."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("BENCH_CACHE_DIR") or "~/.cache/qusec-bench/models").expanduser()


VERIFY_TOLERANCE = 0.02  # a verified fact (an accuracy) may differ this much, e.g. between devices


@dataclass
class ModelCache:
    """Trained weights on disk under ``root/<dataset>/<label>-<key>.pt`` with a ``.json`` sidecar.

    The sidecar holds the facts of the training (what ``train`` returns, e.g. test accuracy) and the sha256 of
    the weights file, which ties it to those weights. A loaded checkpoint must hold finite weights and agree with
    ``verify`` (cheap facts recomputed from the loaded model), else it is set aside and retrained. A sidecar that
    is unreadable or describes other weights is not believed, but its checkpoint is kept and the sidecar
    rewritten. A read-only cache serves the models it holds.
    """

    root: Path

    def paths(self, dataset: str, label: str, key: str) -> tuple[Path, Path]:
        stem = f"{_safe(label)}-{key}"  # labels may hold dots (eps=0.3): never Path.with_suffix on the stem
        return self.root / dataset / f"{stem}.pt", self.root / dataset / f"{stem}.json"

    def exists(self, dataset: str, label: str, fields: dict[str, Any]) -> bool:
        return self.paths(dataset, label, cache_key(fields))[0].is_file()

    def facts(self, dataset: str, label: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """The sidecar of a cached model (None when there is no checkpoint or no readable sidecar), unverified:
        ``get_or_train`` checks it against the weights when it loads them."""
        weights, sidecar = self.paths(dataset, label, cache_key(fields))
        if not weights.is_file():
            return None
        try:
            facts = json.loads(sidecar.read_bytes())
        except (OSError, ValueError, RecursionError):
            return None
        return facts if isinstance(facts, dict) else None

    def partial(self, dataset: str, label: str, fields: dict[str, Any]) -> Path:
        """Where ``fit`` keeps the state of this model's training in progress (its ``checkpoint``)."""
        weights, _ = self.paths(dataset, label, cache_key(fields))
        return weights.with_name(weights.name.removesuffix(".pt") + ".partial.pt")

    def progress(self, dataset: str, label: str, fields: dict[str, Any], device: str) -> float | None:
        """The fraction of this model's training that a saved part-way state holds, if a training on ``device``
        would resume it (None: none, unreadable, or saved on another device, torch or thread count)."""
        try:
            state = torch.load(self.partial(dataset, label, fields), map_location="cpu", weights_only=True)
            runtime = _runtime(device)
            if {key: state["identity"][key] for key in runtime} != runtime:
                return None
            return state["step"] / state["total"]
        except Exception:  # noqa: BLE001 - an estimate only: an unusable state counts as no progress
            return None

    def remove(self, dataset: str, label: str, fields: dict[str, Any]) -> None:
        """Forget a trained model and any training of it in progress (``--fresh``)."""
        for path in (*self.paths(dataset, label, cache_key(fields)), self.partial(dataset, label, fields)):
            path.unlink(missing_ok=True)

    def get_or_train(self, dataset: str, label: str, fields: dict[str, Any], build: Callable[[], nn.Module],
                     train: Callable[[nn.Module], dict[str, Any]],
                     verify: Callable[[nn.Module], dict[str, float]] | None = None) -> tuple[nn.Module, dict[str, Any]]:
        """The model for ``fields``: loaded from the cache, else built, trained by ``train`` and stored.

        Returns (model, facts): the sidecar's facts (``train`` may add some, e.g. accuracy) and ``cached``.
        """
        weights, sidecar = self.paths(dataset, label, cache_key(fields))
        lock = weights.with_suffix(".lock")
        for path in (weights, sidecar, lock):
            if path.exists() and not path.is_file():
                raise BenchError(f"{path}: expected a file in the model cache, found a directory or device; "
                                 f"remove it or choose another --cache-dir")
        try:
            weights.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BenchError(f"model cache {self.root}: cannot create {weights.parent} "
                             f"({exc.strerror or exc})") from None
        with _file_lock(lock, required=not weights.is_file()) as locked:
            if weights.is_file():
                loaded = self._load(weights, sidecar, fields, build, verify, locked)
                if loaded is not None:
                    return loaded
            model = build()
            start = time.perf_counter()
            facts = train(model)
            seconds = time.perf_counter() - start
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            if not _finite(state):
                raise ValueError("training produced non-finite weights (NaN or inf); not cached")
            buffer = io.BytesIO()
            torch.save(state, buffer)
            digest = hashlib.sha256(buffer.getvalue()).hexdigest()
            write_bytes(weights, buffer.getvalue())
            facts = {"key": fields, "train_seconds": round(seconds, 2), "version": __version__, **facts,
                     "weights_sha256": digest}
            write_bytes(sidecar, (json.dumps(facts, indent=2, default=str) + "\n").encode())
            self.partial(dataset, label, fields).unlink(missing_ok=True)
            return model.eval(), {**facts, "cached": False}

    def _load(self, weights: Path, sidecar: Path, fields: dict[str, Any], build: Callable[[], nn.Module],
              verify: Callable[[nn.Module], dict[str, float]] | None,
              writable: bool) -> tuple[nn.Module, dict[str, Any]] | None:
        """The cached model and its facts, or None when the checkpoint cannot be trusted and was set aside."""
        try:
            raw = weights.read_bytes()
            model = build()
            model.load_state_dict(torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is retrained, never trusted
            return _set_aside(weights, f"unreadable checkpoint ({type(exc).__name__}: {exc})", writable)
        if not _finite(model.state_dict()):
            return _set_aside(weights, "non-finite weights (NaN or inf)", writable)
        digest = hashlib.sha256(raw).hexdigest()
        recorded, problem = _sidecar_facts(sidecar, digest)
        fresh = verify(model.eval()) if verify is not None else {}
        for name, value in fresh.items():
            old = recorded.get(name)
            if isinstance(old, int | float) and not abs(old - value) <= VERIFY_TOLERANCE:
                return _set_aside(weights, f"{name} of the loaded model is {value}, its sidecar records {old}",
                                  writable)
        facts = {**recorded, **fresh}
        if problem or recorded.get("weights_sha256") != digest:  # tie the sidecar to these weights
            if problem:
                warnings.warn(f"{sidecar}: {problem}; checkpoint kept, sidecar rewritten", stacklevel=3)
            facts = {"key": fields, "version": __version__, **facts, "weights_sha256": digest}
            if writable:
                with suppress(BenchError):
                    write_bytes(sidecar, (json.dumps(facts, indent=2, default=str) + "\n").encode())
        return model.eval(), {**facts, "cached": True}


def _sidecar_facts(path: Path, digest: str) -> tuple[dict[str, Any], str | None]:
    """The facts of a sidecar that belongs to the weights of sha256 ``digest``: ({}, why) when it is unreadable
    or describes other weights. A sidecar of an older harness, without a hash, is taken (``verify`` checks it)."""
    if not path.is_file():
        return {}, None
    try:
        facts = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        return {}, f"unreadable sidecar ({type(exc).__name__})"
    if not isinstance(facts, dict):
        return {}, "unreadable sidecar (not a JSON object)"
    if facts.get("weights_sha256", digest) != digest:
        return {}, "sidecar describes other weights (sha256 differs)"
    return facts, None


def _set_aside(weights: Path, reason: str, writable: bool) -> None:
    """Move an untrustworthy checkpoint out of the way (it is retrained) and say so."""
    aside = weights.with_suffix(f".corrupt-{int(time.time())}")
    try:
        if not writable:
            raise PermissionError("the model cache is read-only")
        weights.replace(aside)
    except OSError as exc:
        raise BenchError(f"{weights}: {reason}, and it cannot be moved aside ({exc}); remove it or choose another "
                         f"--cache-dir") from None
    warnings.warn(f"{weights}: {reason}; moved to {aside.name} and retraining", stacklevel=4)


def _finite(state: Mapping[str, Any]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@contextmanager
def _file_lock(path: Path, required: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``path``; yields whether it is held. In a read-only cache (the lock file cannot be
    created) a model the cache holds is read without it; one it does not hold (``required``) is an error."""
    try:
        handle = open(path, "a+")  # noqa: SIM115 - closed below, after the lock is released
    except OSError as exc:
        if required:
            raise BenchError(f"model cache {path.parent}: cannot create {path.name} ({exc.strerror or exc}) to "
                             f"train a model it lacks; point --cache-dir at a writable directory") from None
        handle = None
    if handle is None:
        yield False
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "=,.-_" else "_" for c in label)


# Training settings added after model-cache keys were first written: left out of the key at their defaults, so the
# key (and the cached weights) of every configuration that does not set them stays what it was.
KEYED_WHEN_SET = ("optimizer", "weight_decay", "label_smoothing")


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings as they enter the model-cache and cell keys."""
    data = asdict(cfg)
    for name in KEYED_WHEN_SET:
        if data[name] == TrainConfig.__dataclass_fields__[name].default:
            del data[name]
    return data
