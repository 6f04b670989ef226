"""Architectures by name and safe model files."""

from malex.models.classifier import Classifier, Normalize
from malex.models.io import load_model, read_description, save_model
from malex.models.registry import ARCHITECTURES, build_model

__all__ = ["ARCHITECTURES", "Classifier", "Normalize", "build_model", "load_model", "read_description", "save_model"]
