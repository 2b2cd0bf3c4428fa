"""Crafted examples of the transfer threats on disk, so that a resumed run or another slice (``--only``) of the
same grid does not craft them again.

Only craftings that do not depend on the defended model are stored: those a threat names ``shared`` (oblivious:
on the undefended CNN; black-box: on a substitute), which one process already crafts once for every defense. Across
processes they used to be crafted again by each run, which on CIFAR-10 costs about 14 minutes for JSMA on the
undefended CNN alone. No library keeps adversarial examples between runs, hence this module.

A stored crafting is used only when everything it is a function of is unchanged. Its key hashes the attacked
model's weights (their bytes, not the cache's name for them) and class, the attack component and its parameters,
eps, the attempts' images, labels and targets, the seed, the batch size, device and step savings (some attacks
decide per batch), the torch, torchattacks and ART versions, and the source of the harness and of the classes
of the attack and the model (a plug-in's file included). A file that cannot be read or whose key differs is
crafted again; files are replaced atomically; a read-only cache is only read. ``bench run --fresh`` reads none.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.craft import Crafted
from bench.errors import BenchError
from bench.results import write_bytes

PACKAGE = Path(__file__).resolve().parent


def _file_digest(path: Path) -> str:
    stat = path.stat()  # an edited file hashes again
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.cache
def _package_digest() -> str:
    files = sorted(PACKAGE.rglob("*.py"))
    return hashlib.sha256("".join(f"{f.relative_to(PACKAGE)}:{_file_digest(f)}\n" for f in files)
                          .encode()).hexdigest()


@functools.cache
def _versions() -> dict[str, str]:
    found = {"torch": torch.__version__}
    for name in ("torchattacks", "adversarial-robustness-toolbox"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def code_digest(*objects: object) -> str:
    """The harness's source, and the source file of every class (and base class) of ``objects`` and of their
    submodules that lives outside the harness and torch: a plug-in attack's or model's."""
    classes = {cls for obj in objects for part in (obj.modules() if isinstance(obj, nn.Module) else [obj])
               for cls in type(part).__mro__}
    parts = [_package_digest()]
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        try:
            source = Path(inspect.getsourcefile(cls) or "")
        except TypeError:  # built-in classes have no source file
            continue
        if source.is_file() and not source.resolve().is_relative_to(PACKAGE) and "torch" not in source.parts:
            parts.append(f"{cls.__module__}.{cls.__qualname__}:{_file_digest(source)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(b"none" if t is None else f"{t.dtype}{tuple(t.shape)}".encode() + t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """Hash of every parameter and buffer of ``model``, with their names."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor_digest(value).encode())
    return h.hexdigest()


class CraftStore:
    """Craftings under ``root/<dataset>/crafted/<key>.pt`` (see the module docstring); ``read`` False: compute
    and store, never reuse (``--fresh``)."""

    def __init__(self, root: Path, read: bool = True) -> None:
        self.root, self.read = root, read

    def get(self, dataset: str, fields: dict[str, Any], make: Callable[[], Crafted]) -> Crafted:
        """The stored crafting for ``fields``, else ``make()``, stored. ``fields`` must name everything the
        crafting is a function of, :func:`code_digest` of the attack and the model included."""
        fields = {**fields, "versions": _versions()}
        text = json.dumps(fields, sort_keys=True, default=str)
        path = self.root / dataset / "crafted" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.pt"
        if self.read and path.is_file():
            stored = self._load(path, text)
            if stored is not None:
                return stored
        crafted = make()
        buffer = io.BytesIO()
        torch.save({"key": text, "x_adv": crafted.x_adv, "forwards": crafted.forwards,
                    "backwards": crafted.backwards, "stats": json.dumps(crafted.stats, default=str)}, buffer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, buffer.getvalue())
        except (OSError, BenchError) as exc:
            warnings.warn(f"crafted examples not stored ({exc}); a later run crafts them again", stacklevel=2)
        return crafted

    @staticmethod
    def _load(path: Path, text: str) -> Crafted | None:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            if raw["key"] != text or not isinstance(raw["x_adv"], torch.Tensor):
                raise ValueError("its key differs")
            return Crafted(raw["x_adv"], int(raw["forwards"]), int(raw["backwards"]), json.loads(raw["stats"]))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is crafted again, never trusted
            warnings.warn(f"{path}: stored crafting not used ({type(exc).__name__}: {exc}); crafting again",
                          stacklevel=3)
            return None
