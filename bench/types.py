"""The dataset enum: strings become it where they enter (suite parsing, CLI). Threat models are a registry
(:mod:`bench.threats`), like defenses and attacks."""

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

