"""Typed errors. Each says what was wrong and what was expected."""

from __future__ import annotations


class MalexError(Exception):
    """Base class for every error malex raises on purpose."""


class InputError(MalexError, ValueError):
    """User-supplied inputs (images, labels, arrays) have the wrong shape, dtype or values."""


class DataFileError(MalexError):
    """A dataset file is missing, unreadable, or holds arrays of the wrong form."""


class ModelFileError(MalexError):
    """A model or guard file is missing, corrupt, truncated, foreign or does not match."""


class NotFittedError(MalexError, RuntimeError):
    """A detector or guard was used before `fit`."""


class ConfigError(MalexError, ValueError):
    """A setting or name (architecture, attack, detector) is unknown or out of range."""
