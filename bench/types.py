"""The enums of the harness: strings become these where they enter (suite parsing, CLI)."""

from __future__ import annotations

from enum import Enum


class Dataset(str, Enum):
    MNIST = "mnist"
    CIFAR10 = "cifar10"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Input shape C×H×W."""
        return (1, 28, 28) if self is Dataset.MNIST else (3, 32, 32)

    @property
    def classes(self) -> int:
        return 10


class Threat(str, Enum):
    """How much the attacker knows: see docs in README ("Threat models")."""

    WHITEBOX = "whitebox"
    BLACKBOX = "blackbox"
    BPDA = "bpda"

    @property
    def short(self) -> str:
        return {"whitebox": "wb", "blackbox": "bb", "bpda": "bpda"}[self.value]
