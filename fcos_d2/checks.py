"""Argument checks shared by every fcos_d2 module, so that every bad value is reported alike.

Messages start with the yacs key (``MODEL.FCOS.NORM must be one of ...``), because most users set
values in YAML files, and end with the constructor argument it arrived as, for LazyConfig users.
"""

from collections.abc import Collection
from typing import Any


class ConfigError(ValueError):
    """Input that fcos_d2 cannot use: a config key or value, a command-line argument, or a file
    the user named. Every command prints its message in one line and exits with status 2
    (:func:`fcos_d2.cli.run_command`)."""


def fail(key: str, requirement: str, value: Any, where: str = "", verb: str = "must be") -> None:
    """Raise the one ConfigError format: ``KEY must be REQUIREMENT, got VALUE (WHERE)``."""
    suffix = f" ({where})" if where else ""
    raise ConfigError(f"{key} {verb} {requirement}, got {value!r}{suffix}")


def check_choice(value: Any, choices: Collection[Any], key: str, where: str = "") -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        fail(key, f"one of {tuple(choices)}", value, where)


def check_that(
    condition: bool, key: str, requirement: str, value: Any, where: str = "", verb: str = "must be"
) -> None:
    """``condition`` must hold; otherwise report ``value`` against ``requirement``."""
    if not condition:
        fail(key, requirement, value, where, verb)
