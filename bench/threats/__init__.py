"""Threat models, one module each, registered by decorator: which model the attacker differentiates or queries."""

from bench.threats.base import REGISTRY, Source, Threat

__all__ = ["REGISTRY", "Source", "Threat"]
