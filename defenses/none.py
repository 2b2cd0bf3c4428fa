"""The undefended Cleverhans CNN: the baseline every defense is measured against."""

from defenses.base import REGISTRY, Defense


@REGISTRY.register
class NoDefense(Defense):
    """No defense: the plain CNN (the paper's baseline)."""

    name = "none"
