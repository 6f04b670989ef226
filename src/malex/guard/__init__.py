"""The Guard: fit detectors together, screen inputs, give verdicts, save and load."""

from malex.guard.guard import ADVERSARIAL, BACKDOOR, BENIGN, EVIDENCE, Guard, GuardConfig, Screening
from malex.guard.io import load_guard, save_guard

__all__ = ["ADVERSARIAL", "BACKDOOR", "BENIGN", "EVIDENCE", "Guard", "GuardConfig", "Screening", "load_guard",
           "save_guard"]
