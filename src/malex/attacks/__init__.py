"""Attacks: backdoor triggers with poisoned training, and adversarial examples; `Crafted` holds the
successful malicious inputs of either kind."""

from malex.attacks.crafted import Crafted

__all__ = ["Crafted"]
