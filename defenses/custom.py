"""A preprocessing defense from a file of the user's: ``preprocess = "my_defense:build"`` in a suite.

The callable gets the entry's ``params`` table as keyword arguments and returns an ``nn.Module`` mapping images in
[0, 1] to images of the same shape in [0, 1]. The harness did not write it, so it checks it before any cell runs
(shape and range, :meth:`Custom.check_output`), and the ``bpda`` threat probes it per model (zero or non-finite
gradients: straight-through backward; random forward passes: Expectation over Transformation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError, SuiteError
from bench.plugins import locate, resolve, sha256_file
from bench.registry import Param, fmt_value
from bench.types import Dataset
from defenses.base import REGISTRY, Defense

HARNESS_SET = ("file", "sha256")
RANGE_SLACK = 1e-6


class UserPreprocess(nn.Module):
    """The user's module in front of the CNN; under ``bpda`` its backward is straight-through when the probe finds
    its gradient masked (see :class:`bench.threats.bpda.BPDA`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def bpda_approx(self, backward: str, z: float) -> nn.Module | None:
        return None


@REGISTRY.register
class Custom(Defense):
    """Your own preprocessing defense: ``preprocess = "module:callable"`` returns an nn.Module [0, 1] → [0, 1].

    The module is found next to the suite file first, then on sys.path; ``params`` are passed to the callable.
    ``retrain = true`` trains the CNN with the module in front (like CQ), ``false`` puts it in front of the
    undefended weights. The sha256 of the module's source file is part of the model-cache and cell keys, so
    editing the file retrains and re-evaluates. Id: ``custom(module:callable,k=v,...)`` or ``label``.
    """

    name = "custom"
    untrusted = True
    bpda_variants = ("auto",)
    params = (
        Param("preprocess", str, "", "module:callable returning the preprocessing nn.Module (required)"),
        Param("retrain", bool, True, "train the CNN with the module in front; false: reuse the undefended weights"),
        Param("params", dict, {}, "keyword arguments of the callable (part of the id and of the cache key)"),
        Param("label", str, "", "readable id in records and tables instead of custom(...)", inference_only=True),
        Param("file", str, "", "set by the harness: the module's file next to the suite (empty: from sys.path)",
              inference_only=True, in_key=False),
        Param("sha256", str, "", "set by the harness: sha256 of the module's source file"),
    )

    @classmethod
    def prepare(cls, entry: dict[str, Any], given: dict[str, Any], source: str, path: str,
                base: Path | None) -> dict[str, Any]:
        """Locate the module (a SuiteError when it or its callable cannot be found) and note its file and hash."""
        for key in HARNESS_SET:
            if key in entry:
                raise SuiteError(source, f"{path}.{key}", "set by the harness, not by the suite")
        ref = given.get("preprocess", "")
        if not ref:
            raise SuiteError(source, f"{path}.preprocess", "missing: expected module:callable, e.g. my_defense:build")
        try:
            file, digest = locate(ref, base)
        except BenchError as exc:
            raise SuiteError(source, f"{path}.preprocess", str(exc)) from None
        return {**given, "file": file, "sha256": digest}

    @classmethod
    def make_id(cls, values: dict[str, Any], dataset: Dataset) -> str:
        if values.get("label"):
            return values["label"]
        parts = [values.get("preprocess", ""), *(f"{k}={fmt_value(v)}" for k, v in values.get("params", {}).items())]
        if values.get("retrain") is False:
            parts.append("retrain=false")
        return f"custom({','.join(parts)})"

    @property
    def shares_weights_with_none(self) -> bool:  # type: ignore[override]
        return not self.values["retrain"]

    def weights_key(self) -> dict[str, Any]:
        if not self.values["retrain"]:
            return {"defense": "none"}
        return {"defense": self.name, "preprocess": self.values["preprocess"], "params": self.values["params"],
                "sha256": self.values["sha256"]}

    def weights_label(self) -> str:
        if not self.values["retrain"]:
            return "none"
        return f"custom-{self.values['preprocess']}-{self.values['sha256'][:8]}"

    def preprocess(self) -> nn.Module:
        file = self.values["file"]
        if file and sha256_file(file) != self.values["sha256"]:
            raise BenchError(f"defense {self.id}: {file} changed since the suite was read; run again")
        module = resolve(self.values["preprocess"], self.values["file"])(**self.values["params"])
        if not isinstance(module, nn.Module):
            raise BenchError(f"defense {self.id}: {self.values['preprocess']} returned {type(module).__name__}, "
                             f"expected a torch.nn.Module")
        return UserPreprocess(module)

    def check_output(self, x: torch.Tensor) -> None:
        """Refuse a module whose output on evaluated images ``x`` has another shape or leaves [0, 1]."""
        module = self.preprocess().eval()
        try:
            with torch.no_grad():
                out = module(x)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line naming the defense
            raise BenchError(f"defense {self.id}: the preprocessing module raised {type(exc).__name__}: {exc}") from None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BenchError(f"defense {self.id}: the preprocessing module returned shape {shape} for images of "
                             f"shape {tuple(x.shape)}; expected the same shape")
        if not bool(torch.isfinite(out).all()) or out.min() < -RANGE_SLACK or out.max() > 1 + RANGE_SLACK:
            raise BenchError(f"defense {self.id}: the preprocessing module's output leaves [0, 1] (min "
                             f"{float(out.min()):g}, max {float(out.max()):g}); expected images in [0, 1]")
