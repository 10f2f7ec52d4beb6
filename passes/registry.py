"""The pass registry: CLI name -> pass class, which pipeline strings, budgets and replay look passes up in.

>>> pass_class("grouped").__name__
'Grouped'
"""

from __future__ import annotations

from fxrewrite.errors import ConfigError

from .interface import Pass

REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Add a pass class to the registry under its ``name``; returns it (usable as a decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def pass_class(name: str) -> type[Pass]:
    """The registered pass class of a CLI name (``ConfigError`` naming the valid ones when there is none)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"no pass named {name!r} in this fxrewrite; valid passes: {', '.join(sorted(REGISTRY))}")
    return cls
