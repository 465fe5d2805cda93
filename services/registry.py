"""The hashing methods installed, found through the ``medhash.methods`` entry-point group.

Each entry names a :class:`~medhash.services.methods.base.HashModel` subclass; a method package of a
hospital's own registers its methods the same way, without editing medhash. Nothing here imports a
method until its class is asked for, so reading a configuration stays light.
"""
from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from medhash.services.errors import ConfigError

GROUP = "medhash.methods"


@cache
def _entries() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=GROUP)}


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_entries())


def method_class(name: str) -> type:
    """The model class registered as ``name``; ConfigError for an unknown name."""
    if name not in _entries():
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    return _entries()[name].load()
