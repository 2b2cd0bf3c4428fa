"""Defenses: one module each, registered by decorator. ``REGISTRY.get(name)`` returns the class."""

from defenses.base import REGISTRY, Defense

__all__ = ["REGISTRY", "Defense"]
