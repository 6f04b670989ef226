"""malex: screen the inputs of an image classifier for adversarial and backdoor examples."""

from malex.errors import (
    ConfigError,
    DataFileError,
    InputError,
    MalexError,
    ModelFileError,
    NotFittedError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataFileError",
    "InputError",
    "MalexError",
    "ModelFileError",
    "NotFittedError",
    "__version__",
]
