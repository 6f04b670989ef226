"""Architectures by name, safe model files, and any PyTorch classifier as a source (`load(ModelSpec(...))`)."""

from malex.models.classifier import Classifier, Normalize
from malex.models.io import load_model, read_description, save_model
from malex.models.preprocess import Preprocessing
from malex.models.registry import ARCHITECTURES, build_model
from malex.models.sources import LoadedModel, ModelSpec, load

__all__ = ["ARCHITECTURES", "Classifier", "LoadedModel", "ModelSpec", "Normalize", "Preprocessing", "build_model",
           "load", "load_model", "read_description", "save_model"]
