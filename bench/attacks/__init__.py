"""Attack adapters over torchattacks and ART, one module each, registered by decorator."""

from bench.attacks.base import REGISTRY, Attack

__all__ = ["REGISTRY", "Attack"]
