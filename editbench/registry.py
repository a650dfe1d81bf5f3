"""The editor registry: the one way the harness finds editors.

Each editor lives in ``editors/<name>.py`` (or a package ``editors/<name>/``) and
registers its class with ``@register("<name>")``. The harness imports the module on
demand, so listing the valid names needs no import of any editor.
"""
from __future__ import annotations

import importlib
import pkgutil

EDITORS: dict[str, type] = {}
_NOT_EDITORS = {"base", "lib"}


def register(name: str):
    """Class decorator: make an Editor subclass available as ``editor=<name>``."""

    def wrap(cls):
        if name in EDITORS and EDITORS[name] is not cls:
            raise ValueError(f"two editors registered as '{name}': {EDITORS[name]} and {cls}")
        cls.name = name
        EDITORS[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names of every editor module shipped in the ``editors`` package."""
    import editors

    return sorted(m.name for m in pkgutil.iter_modules(editors.__path__)
                  if m.name not in _NOT_EDITORS and not m.name.startswith("_"))


def editor_class(name: str) -> type:
    """The Editor class registered as ``name``; an unknown name lists the valid ones."""
    if name not in EDITORS:
        if name not in available():
            raise ValueError(f"unknown editor '{name}'; valid editors: {', '.join(available())}")
        importlib.import_module(f"editors.{name}")
    if name not in EDITORS:
        raise ValueError(f"module editors.{name} did not register an editor named '{name}'")
    return EDITORS[name]
