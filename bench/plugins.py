"""Code from outside the package: ``module:callable`` references and plug-in modules a suite names.

A reference ``pkg.mod:name`` is looked up next to the suite file first (``pkg/mod.py`` or
``pkg/mod/__init__.py`` in its folder, imported from that file) and then on ``sys.path`` (an ordinary import).
A plug-in (``plugins = [...]``) is a file path relative to the suite (``extra/attack.py``) or a dotted module
name; importing it runs its ``register`` decorators, so its classes join the registries like built-ins, with
their origin (``plugin: PATH``). Workers of other executors import the same list (:func:`activate`).
Installed distributions register through the entry-point groups ``qusec_bench.defenses``,
``qusec_bench.attacks`` and ``qusec_bench.threats`` (see :class:`bench.registry.Registry`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.registry import Registry

_FILES: dict[tuple[str, str], ModuleType] = {}  # (resolved path, sha256) → module imported from that file


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_ref(ref: str) -> tuple[str, str]:
    """``"pkg.mod:name"`` → (``"pkg.mod"``, ``"name"``); a BenchError when it is not of that form."""
    module, sep, name = ref.partition(":")
    if not sep or not module or not name or not all(p.isidentifier() for p in [*module.split("."), *name.split(".")]):
        raise BenchError(f"expected module:callable (e.g. my_defense:build), got {ref!r}")
    return module, name


def local_file(module: str, base: Path | None) -> Path | None:
    """The file of dotted ``module`` inside folder ``base``, if there is one."""
    if base is None:
        return None
    stem = base.joinpath(*module.split("."))
    for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def import_file(path: Path, origin: str | None = None) -> ModuleType:
    """The module of the Python file ``path`` (imported once per file content, under a private name)."""
    path = path.resolve()
    digest = sha256_file(path)
    key = (str(path), digest)
    if key not in _FILES:
        name = f"_qusec_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise BenchError(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            with Registry.loading(origin or f"plugin: {path}"):
                spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - the user's code: one line naming the file
            del sys.modules[name]
            raise BenchError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from None
        _FILES[key] = module
    return _FILES[key]


def _import_name(module: str, origin: str | None = None) -> ModuleType:
    try:
        with Registry.loading(origin or f"plugin: {module}"):
            return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise BenchError(f"module {module!r} is neither next to the suite file nor on sys.path") from None
        raise BenchError(f"module {module!r}: importing it raised ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's code: one line naming the module
        raise BenchError(f"module {module!r}: importing it raised {type(exc).__name__}: {exc}") from None


def locate(ref: str, base: Path | None) -> tuple[str, str]:
    """Where ``ref`` lives: (its file next to the suite, or ``""`` when it comes from ``sys.path``; sha256 of the
    module's source file). Imports the module and checks that the callable exists."""
    module, _ = split_ref(ref)
    path = local_file(module, base)
    resolve(ref, str(path) if path else "")
    source = path or getattr(sys.modules[module], "__file__", None)
    if source is None:
        raise BenchError(f"{ref}: module {module!r} has no source file to hash")
    return (str(path) if path else "", sha256_file(source))


def resolve(ref: str, file: str = "") -> Callable[..., Any]:
    """The callable ``ref`` names, from ``file`` when given (as :func:`locate` found it), else from ``sys.path``."""
    module_name, attr = split_ref(ref)
    module = import_file(Path(file)) if file else _import_name(module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BenchError(f"{ref}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BenchError(f"{ref}: {attr!r} is not callable")
    return obj


def plugin_location(entry: str, base: Path | None) -> str:
    """A suite's plug-in entry as workers import it: an absolute file path, or a dotted module name."""
    if entry.endswith(".py") or "/" in entry:
        path = (base / entry if base else Path(entry)).resolve()
        if not path.is_file():
            raise BenchError(f"plug-in file {entry!r} not found (looked for {path})")
        return str(path)
    if not all(p.isidentifier() for p in entry.split(".")):
        raise BenchError(f"expected a .py file path or a dotted module name, got {entry!r}")
    local = local_file(entry, base)
    return str(local) if local else entry


def activate(plugins: Iterable[str]) -> None:
    """Import plug-ins (absolute file paths or dotted module names, as :func:`plugin_location` returns them)."""
    for entry in plugins:
        if entry.endswith(".py"):
            import_file(Path(entry))
        else:
            _import_name(entry)


def load_model(ref: str, file: str, shape: tuple[int, int, int]) -> nn.Module:
    """The user's trained classifier: ``ref`` called without arguments must return an ``nn.Module`` that maps a
    batch of images of ``shape`` in [0, 1] to 10 logits."""
    model = resolve(ref, file)()
    if not isinstance(model, nn.Module):
        raise BenchError(f"{ref} returned {type(model).__name__}, expected a trained torch.nn.Module")
    model = model.eval().requires_grad_(False)
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *shape))
    except Exception as exc:  # noqa: BLE001 - the user's code: one line
        raise BenchError(f"{ref}: the model raised {type(exc).__name__} on a batch of shape {(2, *shape)}: {exc}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 10):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"{ref}: the model returned {found} for 2 images; expected logits of shape (2, 10)")
    return model


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes and values): the identity of a user's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.float().numpy().tobytes())
    return digest.hexdigest()
