"""Evaluating one cell, scored as AutoAttack does.

The threat model names the model the attack runs on (:mod:`bench.threats`); the attack runs (component by
component for an ensemble such as ``autoattack``) only on the images still standing; every adversarial example is
projected into [0, 1] and the eps ball and re-scored on the real defended model by the harness. An image is
robust only if the defended model classifies it correctly clean *and* after every attempt; success and
perturbation norms count clean-correct images only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from threading import Event
from typing import Any

import torch

from bench import plugins, provenance, sheet
from bench.attacks import REGISTRY as ATTACKS
from bench.attacks.base import Runtime
from bench.bpda import EOT
from bench.craft import CountingModel, Crafted, attack_batch, choose_targets, craft, logits_of, project
from bench.crafted import CraftStore, code_digest, model_digest, tensor_digest
from bench.errors import Interrupted
from bench.grid import SCORING_REVISION, Cell
from bench.models import predict
from bench.probe import probe
from bench.provider import Models
from bench.results import pack_mask
from bench.settings import Settings
from bench.threats import REGISTRY as THREATS

CHANGED = 1e-6  # a pixel value counts as changed (l0) when it moved by more than this


@dataclass
class Context:
    """What the cells evaluated in one process share: the model provider, crafted examples that do not depend on
    the defense (transfer threats) and model probes. Only pure functions of cell specs are memoised."""

    settings: Settings = field(default_factory=Settings)
    stop: Event = field(default_factory=Event)
    models: Models = field(init=False)
    crafted: CraftStore = field(init=False)
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.settings.device.startswith("cuda"):
            # TF32 convolutions (cuDNN's default) round to a 10-bit mantissa, and cuDNN may pick another kernel
            # for the scoring batch than for the attack batch: an image on the boundary could be fooled in the
            # attack and robust when re-scored. Full fp32 keeps the two the same computation, as on the CPU.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        plugins.activate(self.settings.plugins)
        self.models = Models(self.settings, self.stop)
        self.crafted = CraftStore(self.models.cache.root, read=self.settings.reuse_crafted)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted

    def shared(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def craftings(self) -> list[Crafted]:
        """The crafting runs that several cells shared (oblivious, black-box), each once."""
        return [value for key, value in self._memo.items() if key[0] == "craft"]

    def probe(self, cell: Cell) -> dict[str, Any]:
        """:func:`bench.probe.probe` of the cell's defended model on its evaluated images, once per model."""
        _, x, y = self.models.eval_set(cell)
        return self.shared(("probe", self.models.model_key(cell), cell.n, cell.sample),
                           lambda: probe(self.models.model(cell), x, y))


def per_image(ok: torch.Tensor, n: int) -> torch.Tensor:
    """Per image: True only if every attempt on it (one, or one per target class) is True."""
    return ok.reshape(n, -1).all(1)


def _mean(values: torch.Tensor) -> float | None:
    return round(float(values.mean()), 6) if len(values) else None


def _seed(*parts: Any) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def craft_cell(cell: Cell, ctx: Context, model: torch.nn.Module, *,
               early_stop: bool = False) -> tuple[Crafted, torch.Tensor, torch.Tensor | None]:
    """The cell's attack on every evaluated image of the cell on ``model``, as ``bench run`` crafts it (targets,
    batches, seeds), without scoring; (crafted, image index per attempt, targets). For measurements and tests."""
    _, x, y = ctx.models.eval_set(cell)
    attack = ATTACKS.get(cell.attack)(cell.attack_values)
    counted_targets = CountingModel(model)
    rep, targets = choose_targets(attack.target_mode, y, lambda xb: logits_of(counted_targets, xb), x,
                                  torch.Generator().manual_seed(cell.cell_seed))
    settings = ctx.settings
    runtime = Runtime(batch=settings.batch or attack_batch(cell.dataset, settings.device), device=settings.device,
                      early_stop=early_stop, should_stop=ctx.stop.is_set)
    crafted = craft(attack, model, x[rep], y[rep], targets, cell.eps, cell.cell_seed, runtime)
    crafted.forwards += counted_targets.forwards
    return crafted, rep, targets


def record_base(cell: Cell) -> dict[str, Any]:
    """The fields identifying a cell, shared by result and error records."""
    attack_cls = ATTACKS.get(cell.attack)
    return {
        "suite": cell.suite, "dataset": cell.dataset.value, "defense": cell.defense_id, "defense_name": cell.defense,
        "defense_params": cell.defense_params,
        "attack": cell.attack_id, "attack_name": cell.attack, "attack_params": cell.attack_values,
        "threat": cell.threat, "threat_params": cell.threat_params, "threat_label": cell.threat_label,
        "eps": cell.eps, "targeted": cell.targeted, "target": cell.attack_values.get("target", "none"),
        "norm": attack_cls.bound_norm(), "gradient_free": not attack_cls.gradient,
        "iterative": attack_cls.iterative, "purpose": cell.purpose, "n": cell.n, "sample": cell.sample,
        "seed": cell.cell_seed, "suite_seed": cell.seed, "cell_id": cell.key, "compute_id": cell.compute_key,
        "scoring": SCORING_REVISION, **provenance.stamp(),
    }


def run_cell(cell: Cell, ctx: Context) -> dict[str, Any]:
    """Evaluate one cell and return its record (see README "Results" for the fields).

    ``seconds`` covers the attack and its scoring; training and loading the shared models are not counted.
    """
    models, settings = ctx.models, ctx.settings
    data = models.data(cell.dataset)
    _, x, y = models.eval_set(cell)
    model = models.model(cell)
    clean = models.clean_predictions(cell)
    clean_ok = clean == y
    threat = THREATS.get(cell.threat)()
    attack = ATTACKS.get(cell.attack)(cell.attack_values)
    source = threat.source(cell, ctx)
    facts = ctx.probe(cell)
    eot = max(attack.harness_eot(cell.attack_values), source.eot) if attack.gradient else 1
    attacked = EOT(source.model, eot) if eot > 1 else source.model
    start = time.perf_counter()
    seed = _seed(source.shared, cell.attack_id, cell.eps, cell.seed) if source.shared else cell.cell_seed
    counted_targets = CountingModel(attacked if source.space is None else model)  # least-likely: on pixels
    rep, targets = choose_targets(attack.target_mode, y, lambda xb: logits_of(counted_targets, xb), x,
                                  torch.Generator().manual_seed(seed))
    forwards = counted_targets.forwards
    runtime = Runtime(batch=settings.batch or attack_batch(cell.dataset, settings.device), device=settings.device,
                      early_stop=settings.save_steps and not threat.transfer and not facts["randomized"],
                      should_stop=ctx.stop.is_set, space=source.space)
    norm = ATTACKS.get(cell.attack).bound_norm()
    parts = attack.components() or [(cell.attack_id, attack)]
    adv, pred = x[rep].clone(), clean[rep].clone()
    fooled = torch.zeros(len(rep), dtype=torch.bool)
    standing = clean_ok.clone()
    components, stats = [], {}
    backwards = 0
    for number, (label, part) in enumerate(parts):
        todo = (standing[rep] if settings.save_steps else torch.ones(len(rep), dtype=torch.bool)).nonzero().flatten()
        part_seed = seed if number == 0 else _seed(seed, label)
        if not len(todo):  # nothing left standing: the remaining components cost nothing
            if len(parts) > 1:
                components.append({"attack": label, "robust_acc": round(float(standing.float().mean()), 6),
                                   "robust_mask": pack_mask(standing.tolist()), "queries": 0, "gradients": 0})
            continue
        if source.shared:
            crafted: Crafted = ctx.shared(
                ("craft", source.shared, cell.attack, repr(cell.attack_values), label, cell.eps, cell.n, cell.sample),
                lambda: ctx.crafted.get(cell.dataset.value, {
                    "source": source.shared, "weights": model_digest(attacked), "attack": cell.attack,
                    "values": repr(cell.attack_values), "component": label, "component_values": repr(part.values),
                    "eps": cell.eps, "attempts": tensor_digest(x[rep], y[rep], targets), "seed": part_seed,
                    "batch": runtime.batch, "device": runtime.device, "early_stop": runtime.early_stop,
                    "code": code_digest(part, attacked)},
                    lambda: craft(part, attacked, x[rep], y[rep], targets, cell.eps, part_seed, runtime)))
            x_part = crafted.x_adv[todo]
        else:
            crafted = craft(part, attacked, x[rep[todo]], y[rep[todo]],
                            None if targets is None else targets[todo], cell.eps, part_seed, runtime, ids=todo)
            x_part = crafted.x_adv
        if source.space is not None:
            device = settings.device
            x_part = source.space.decode(x_part.to(device), x[rep[todo]].to(device)).cpu()
        x_part = project(x_part, x[rep[todo]], cell.eps, norm)
        p = predict(model, x_part)
        if len(parts) == 1:
            adv[todo], pred[todo] = x_part, p
        else:
            new = (p != y[rep[todo]]) & ~fooled[todo]
            adv[todo[new]], pred[todo[new]] = x_part[new], p[new]
            fooled[todo[new]] = True
        standing &= per_image(pred == y[rep], len(y))
        forwards, backwards = forwards + crafted.forwards, backwards + crafted.backwards
        stats.update(crafted.stats)
        if len(parts) > 1:
            components.append({"attack": label, "robust_acc": round(float(standing.float().mean()), 6),
                               "robust_mask": pack_mask(standing.tolist()), "queries": crafted.forwards,
                               "gradients": crafted.backwards})
    attack_seconds = time.perf_counter() - start
    correct = pred == y[rep]
    robust = clean_ok & per_image(correct, len(y))
    on_clean = clean_ok[rep]
    success = (~correct if targets is None else pred == targets) & on_clean
    delta = (adv - x[rep]).flatten(1)[success]
    record = {
        **record_base(cell),
        "defense_resolved": models.defense(cell).id,
        "clean_acc": round(float(clean_ok.float().mean()), 6),
        "robust_acc": round(float(robust.float().mean()), 6),
        "success_rate": round(float(success.sum() / on_clean.sum()), 6) if on_clean.any() else None,
        "attempts": len(rep),
        "l0": _mean((delta.abs() > CHANGED).float().mean(1)),
        "l2": _mean(delta.norm(dim=1)),
        "linf": _mean(delta.abs().amax(1)),
        "queries": forwards, "gradients": backwards,
        "clean_mask": pack_mask(clean_ok.tolist()), "robust_mask": pack_mask(robust.tolist()),
        **({"components": components} if components else {}),
        **stats, **source.extra,
        "grad_zero": facts["grad_zero"], "randomized": facts["randomized"], "early_stop": runtime.early_stop,
        **({"eot": eot} if eot > 1 else {}),
        "shared_crafting": bool(source.shared),
        "model_test_acc": models.model_facts(cell).get("test_acc"),
        "weights": models.weights_digest(cell),
        "data_official": data.official, "data_provenance": data.provenance, "device": settings.device,
        "attack_seconds": round(attack_seconds, 3), "error": None,
    }
    detect = models.detector(cell)
    if detect is not None:
        flagged = detect(adv)
        defended = clean_ok & per_image(correct | flagged, len(y))
        record["detected_acc"] = round(float(defended.float().mean()), 6)
        record["detected_mask"] = pack_mask(defended.tolist())
    if cell.keep_examples:
        shown = torch.arange(min(sheet.IMAGES, len(y))) * (len(rep) // len(y))  # the first attempt of each image
        record["examples"] = sheet.capture(model, x[rep[shown]], adv[shown])
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def error_record(cell: Cell, exc: BaseException, seconds: float) -> dict[str, Any]:
    """The record of a cell whose attack raised or produced unusable output: the grid goes on without it."""
    return {**record_base(cell), "clean_acc": None, "robust_acc": None, "success_rate": None, "l0": None,
            "l2": None, "linf": None, "seconds": round(seconds, 3), "error": f"{type(exc).__name__}: {exc}"}
