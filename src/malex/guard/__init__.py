"""The Guard: fit detectors together, screen inputs, give verdicts, save and load."""

from malex.guard.guard import ADVERSARIAL, BACKDOOR, BENIGN, Guard, GuardConfig, Screening, load_guard, save_guard

__all__ = ["ADVERSARIAL", "BACKDOOR", "BENIGN", "Guard", "GuardConfig", "Screening", "load_guard", "save_guard"]
