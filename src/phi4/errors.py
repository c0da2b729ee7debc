"""The one error a refused setting or input raises, and the helper that builds a settings
dataclass refusing unknown keys by name."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

_WARNED: set[str] = set()


class ConfigError(ValueError):
    """A setting, file or input that cannot work: one line naming it and what would be valid."""


def settings_from_dict(cls, group: str, values: Mapping[str, Any]):
    """`cls(**values)`, with a key that is not one of its fields refused by name: a typo in an
    override is an error, not a silently ignored setting."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{group}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return cls(**dict(values))


def deprecated_setting(old: str, new: str, value: Any) -> None:
    """A setting renamed in this release: the old key still works, warned about once per process."""
    if old in _WARNED:
        return
    _WARNED.add(old)
    logging.getLogger("phi4").warning(f"{old} is deprecated and will be removed in the next release: use {new} "
                                      f"(this run: {new}={value!r})")
