"""Typed readers of a parsed TOML table: each returns the value (or the default) or raises `ConfigError` naming
the key by its dotted path and saying what was expected."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from malex.errors import ConfigError

#: a name usable as a folder name (datasets and attacks name folders of the study's output)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def read_table(value: Any, where: str) -> dict[str, Any]:
    """`value` when it is a table (a dict)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
    return value


def check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Refuse the first key of `table` that is not `allowed`."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key {unknown[0]!r}; expected one of "
                          f"{', '.join(sorted(allowed))}")


def read_int(table: Mapping[str, Any], key: str, where: str, default: Any, minimum: int = 0) -> Any:
    """An integer >= `minimum` (bools refused)."""
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}.{key}: {value!r}; expected an integer >= {minimum}")
    return value


def read_float(table: Mapping[str, Any], key: str, where: str, default: Any, low: float, high: float,
               closed: bool = False) -> Any:
    """A finite number strictly between `low` and `high` (or, `closed`, from `low` to `high` inclusive)."""
    value = table.get(key, default)
    if key not in table:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (low <= value <= high if closed else low < value < high):
        span = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
        raise ConfigError(f"{where}.{key}: {value!r}; expected a number in {span}")
    return float(value)


def read_str(table: Mapping[str, Any], key: str, where: str, default: Any, choices: tuple[str, ...] | None = None) -> Any:
    """A non-empty string, one of `choices` when given."""
    value = table.get(key, default)
    if key not in table:
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: {value!r}; expected a non-empty string")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}.{key}: {value!r}; expected one of {', '.join(choices)}")
    return value


def read_bool(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    """true or false."""
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key}: {value!r}; expected true or false")
    return value


def read_names(table: Mapping[str, Any], key: str, where: str, default: Any, known: Mapping | set | None = None,
           what: str = "name") -> Any:
    """A non-empty list of distinct strings, each in `known` when given."""
    value = table.get(key, default)
    if key not in table:
        return value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}.{key}: {value!r}; expected a non-empty list of strings")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}.{key}: {value!r} names one {what} twice")
    if known is not None:
        for v in value:
            if v not in known:
                raise ConfigError(f"{where}.{key}: unknown {what} {v!r}; expected one of {', '.join(known)}")
    return tuple(value)


def check_name(name: str, where: str) -> str:
    """`name` when it is usable as a folder name."""
    if not NAME.match(name):
        raise ConfigError(f"{where}: the name {name!r} is not usable as a folder name; expected letters, digits, "
                          "'_' or '-'")
    return name


def as_settings(table: Mapping[str, Any]) -> dict[str, Any]:
    """Settings for a registry builder: TOML arrays become tuples (frozen configs hold tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def config_fields(config_type: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_type)}
