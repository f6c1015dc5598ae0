"""Errors that say what was wrong and where."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run: names the source, the key, the value and what is allowed."""


class FieldError(ValueError):
    """Raised by a config dataclass's own checks; the loader adds the file and the section."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}: got {value!r}; {allowed}")


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise FieldError(field, value, allowed) unless ok."""
    if not ok:
        raise FieldError(field, value, allowed)
