"""The installation: the pinned CPU torch, the attack libraries, and no torchvision import anywhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_torch_is_the_pinned_cpu_build() -> None:
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"
    if not os.environ.get("BENCH_ALLOW_CUDA"):
        assert torch.version.cuda is None, "a CUDA torch was installed: a dependency dragged it in"


def test_attack_libraries_import_without_torchvision() -> None:
    code = ("import sys, bench.cli, torchattacks, art\n"
            "from bench.attacks import REGISTRY as A\nfrom defenses import REGISTRY as D\n"
            "A.names(); D.names()\n"
            "from art.estimators.classification import PyTorchClassifier\n"
            "assert 'torchvision' not in sys.modules, 'torchvision was imported'\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("module", ["torchattacks", "art"])
def test_libraries_are_the_pinned_versions(module: str) -> None:
    from importlib.metadata import version

    expected = {"torchattacks": "3.5.1", "art": "1.20.1"}[module]
    assert version({"torchattacks": "torchattacks", "art": "adversarial-robustness-toolbox"}[module]) == expected
