"""The pass registry: CLI name -> pass class. Pipeline strings, budgets, replay, the CLI and the dry-run table all
look passes up here, and it is open: ``register`` adds a pass defined anywhere (usable as a class decorator), and
installed distributions add theirs through the ``fxrewrite.passes`` entry-point group, e.g. in a pyproject.toml::

    [project.entry-points."fxrewrite.passes"]
    spatial-separable = "mypackage.passes:SpatialSeparable"

Entry points are loaded on the first lookup (``discover()`` loads ones that appeared since); one that cannot be
loaded or is not a valid pass is skipped with a warning naming it. ``REGISTRY`` is a live read-only mapping.

>>> from dataclasses import dataclass
>>> from fxrewrite.passes import REGISTRY, Pass, pass_class, register, unregister
>>> pass_class("grouped").__name__
'Grouped'
>>> @register
... @dataclass(frozen=True)
... class Nothing(Pass):
...     name = "nothing"
>>> "nothing" in REGISTRY, unregister("nothing") is Nothing, "nothing" in REGISTRY
(True, True, False)
>>> register(Pass)  # doctest: +ELLIPSIS
Traceback (most recent call last):
fxrewrite.errors.ConfigError: cannot register pass class fxrewrite.passes.interface.Pass: it needs a name ...
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import REWRITE_KINDS, ConvSite, Reason

from .candidates import KEEP
from .interface import Pass
from .pipeline import NAME

#: the entry-point group through which installed distributions offer passes (``name = "module:PassClass"``)
ENTRY_POINT_GROUP = "fxrewrite.passes"


def _qualname(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


def _problems(cls: Any, classes: Mapping[str, type[Pass]]) -> list[str]:
    """What keeps ``cls`` from being a registrable pass (empty: nothing)."""
    if not isinstance(cls, type) or not issubclass(cls, Pass):
        return ["it is not a subclass of fxrewrite.passes.Pass"]
    name = cls.name
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return [f"it needs a name (its CLI name, letters, digits, '-' and '_'), got {name!r}"]
    out = []
    if name == KEEP:
        out.append(f"the name {KEEP!r} is reserved (a budget's 'leave the conv as it is')")
    other = classes.get(name)
    if other is not None and other is not cls:
        out.append(f"the name {name!r} is already registered by {_qualname(other)}")
    if "__dataclass_fields__" not in vars(cls):
        out.append("it must be a @dataclass(frozen=True) of its own (its fields are its options)")
        return out
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(cls.description, str):
        out.append(f"description must be a string, got {cls.description!r}")
    if not isinstance(cls.eligibility_column, str):
        out.append(f"eligibility_column must be a string, got {cls.eligibility_column!r}")
    kind = getattr(cls, "kind", "")
    if kind and kind not in REWRITE_KINDS:
        out.append(f"kind {kind!r} is not a structural rewrite kind ({', '.join(REWRITE_KINDS)}); leave it empty and "
                   "say everything in check()")
    if not isinstance(cls.structure_options, Mapping) or set(cls.structure_options) - fields:
        out.append(f"structure_options must map some of its options {sorted(fields)} to values, got "
                   f"{cls.structure_options!r}")
    forms = cls.budget_forms
    if not isinstance(forms, Mapping) or not all(isinstance(k, str) and NAME.fullmatch(k) and callable(v)
                                                 for k, v in forms.items()):
        out.append(f"budget_forms must map form names to form factories, got {forms!r}")
    else:
        for form in forms:
            owner = next((c for c in classes.values() if c is not cls and form in c.budget_forms), None)
            if owner is not None:
                out.append(f"budget form {form!r} is already offered by pass {owner.name!r}")
    return out


class PassRegistry(Mapping[str, type[Pass]]):
    """Name -> pass class, in registration order; reading it loads the entry points first (once)."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self._classes: dict[str, type[Pass]] = {}
        self._group = group
        self._discovered = False

    def _ready(self) -> dict[str, type[Pass]]:
        if not self._discovered:
            self.discover()
        return self._classes

    def __getitem__(self, name: str) -> type[Pass]:
        return self._ready()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._ready()))

    def __len__(self) -> int:
        return len(self._ready())

    def __contains__(self, name: object) -> bool:
        return name in self._ready()

    def __repr__(self) -> str:
        return f"PassRegistry({', '.join(self._ready())})"

    def register(self, cls: type[Pass]) -> type[Pass]:
        problems = _problems(cls, self._classes)
        if problems:
            raise ConfigError(f"cannot register pass class {_qualname(cls)}: {'; '.join(problems)}")
        self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> type[Pass]:
        if name not in self._classes:
            raise ConfigError(f"no pass named {name!r} is registered")
        return self._classes.pop(name)

    def discover(self) -> list[str]:
        """Load the group's entry points whose passes are not registered yet; the names of the passes added. One
        that cannot be loaded or registered is skipped with a ``RuntimeWarning`` naming it."""
        self._discovered = True
        added: list[str] = []
        try:
            entry_points = list(importlib.metadata.entry_points(group=self._group))
        except Exception as exc:  # broken metadata somewhere on sys.path must not stop fxrewrite
            warnings.warn(f"fxrewrite: could not list the {self._group!r} entry points: {exc}", RuntimeWarning,
                          stacklevel=3)
            return added
        for ep in entry_points:
            dist = getattr(getattr(ep, "dist", None), "name", None)
            where = f"entry point {ep.name} = {ep.value} (group {self._group!r}" + (f", distribution {dist})"
                                                                                      if dist else ")")
            try:
                cls = ep.load()
                if isinstance(cls, type) and self._classes.get(getattr(cls, "name", None)) is cls:
                    continue  # registered already (by an earlier discovery, or by its module's own register())
                self.register(cls)
            except Exception as exc:
                warnings.warn(f"fxrewrite: skipped pass {where}: {type(exc).__name__}: {exc}", RuntimeWarning,
                              stacklevel=3)
                continue
            if cls.name != ep.name:
                warnings.warn(f"fxrewrite: {where} registers pass {cls.name!r}: name the entry point after the pass",
                              RuntimeWarning, stacklevel=3)
            added.append(cls.name)
        return added


#: every registered pass, by CLI name (the built-in ones, then ``register``ed and entry-point ones)
REGISTRY = PassRegistry()


def register(cls: type[Pass]) -> type[Pass]:
    """Add a pass class under its ``name``; returns it, so it works as a class decorator (above ``@dataclass``).

    The class must be a ``Pass`` subclass (``ConvRewritePass`` for a conv replacement), a dataclass of its own whose
    fields are its options, with a unique name; its ``structure_options`` must name its options, its
    ``budget_forms`` form names no other pass offers. Registering the same class again changes nothing. Anything
    else is a ``ConfigError`` naming every problem.
    """
    return REGISTRY.register(cls)


def unregister(name: str) -> type[Pass]:
    """Remove the pass registered as ``name`` and return its class (``ConfigError`` if there is none)."""
    return REGISTRY.unregister(name)


def discover() -> list[str]:
    """Load the ``fxrewrite.passes`` entry points that are not loaded yet (they are loaded on the first lookup;
    call this after installing a distribution in a running process); the names of the passes added."""
    return REGISTRY.discover()


def pass_class(name: str) -> type[Pass]:
    """The registered pass class of a CLI name (``ConfigError`` naming the valid ones when there is none)."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"no pass named {name!r} in this fxrewrite; valid passes: {', '.join(sorted(REGISTRY))}")
    return cls


def eligibility_columns() -> list[tuple[str, Callable[[ConvSite], Reason | None]]]:
    """The dry-run table's verdict columns: ``(header, verdict)`` of every registered pass that declares one.

    >>> from fxrewrite.passes.registry import eligibility_columns
    >>> [header for header, _ in eligibility_columns()]
    ['dw-sep', 'grouped-sep', 'grouped']
    """
    return [(cls.eligibility_column, cls.eligibility) for cls in REGISTRY.values() if cls.eligibility_column]
