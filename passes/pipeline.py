"""Pipeline strings: ``"name{key=value, ...},name2"``, the one option-string grammar of fxrewrite.

``parse_spec`` splits one ``name{key=value, ...}`` into its name and raw option strings (budget form strings such as
``"grouped{groups=2|4}"`` are read with it too); ``parse_pipeline`` turns a comma-separated list of them into pass
objects, with typed option values (``parse_value``) and every problem reported together.

>>> parse_spec("grouped-separable{groups=4|8, max_rank=16}")
('grouped-separable', {'groups': '4|8', 'max_rank': '16'})
>>> from fxrewrite.passes import REGISTRY
>>> [type(p).__name__ for p in parse_pipeline("depthwise-separable{rank=2},grouped{groups=4}", REGISTRY)]
['DepthwiseSeparable', 'Grouped']
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from fxrewrite.errors import ConfigError

from .interface import Pass

#: what a pass name (and a budget form name) may be made of
NAME = re.compile(r"[A-Za-z0-9_\-]+")
_SPEC = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*$")


def split_top(text: str) -> list[str]:
    """The comma-separated parts of ``text`` outside braces, stripped, empty parts dropped.

    >>> split_top("grouped{groups=4, init=block}, channel-shuffle")
    ['grouped{groups=4, init=block}', 'channel-shuffle']
    """
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            raise ConfigError(f"unbalanced '}}' at position {i} in pipeline {text!r}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"unbalanced '{{' in pipeline {text!r}")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def spec_items(text: str) -> tuple[str, list[tuple[str, str | None]]]:
    """``name{k=v, ...}`` -> ``(name, [(key, raw value), ...])`` in the order given, the value ``None`` where an item
    has no ``=``; ``ConfigError`` when ``text`` is not a name with an optional brace body.

    >>> spec_items("grouped{groups=4, permute}")
    ('grouped', [('groups', '4'), ('permute', None)])
    """
    m = _SPEC.match(text)
    if not m:
        raise ConfigError(f"cannot parse {text.strip()!r}: expected name or name{{key=value, ...}}")
    items = []
    for item in (s for s in (m.group(2) or "").split(",") if s.strip()):
        key, eq, value = item.partition("=")
        items.append((key.strip(), value.strip() if eq else None))
    return m.group(1), items


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """One ``name{key=value, ...}`` -> ``(name, {key: raw value string})``; a missing value or a repeated key is a
    ``ConfigError`` (all of them in one message). The values are not interpreted: see ``parse_value``.

    >>> parse_spec("tucker2")
    ('tucker2', {})
    >>> parse_spec("grouped{groups=2, groups=4}")
    Traceback (most recent call last):
    fxrewrite.errors.ConfigError: grouped: option 'groups' is given more than once (groups=2, groups=4); give it once
    """
    name, items = spec_items(text)
    options: dict[str, str] = {}
    errors = []
    for key, value in items:
        if value is None:
            errors.append(f"{name}: option {key!r} needs a value (key=value)")
        elif key in options:
            errors.append(f"{name}: option {key!r} is given more than once ({key}={options[key]}, {key}={value}); "
                          "give it once")
        else:
            options[key] = value
    if errors:
        raise ConfigError("; ".join(errors))
    return name, options


def parse_value(text: str) -> Any:
    """Pipeline option literal: int, float, true/false, or a bare string.

    >>> parse_value("4"), parse_value("1e-3"), parse_value("true"), parse_value("'exact'")
    (4, 0.001, True, 'exact')
    """
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t.strip("'\"")


def parse_pipeline(text: str, registry: Mapping[str, type[Pass]]) -> list[Pass]:
    """Parse ``"name{k=v, ...},name2"`` into pass objects against ``registry`` (name -> pass class); every problem
    is reported together. ``fxrewrite.passes.parse_pipeline(text)`` parses against every registered pass."""
    passes: list[Pass] = []
    errors: list[str] = []
    for chunk in split_top(text):
        try:
            name, items = spec_items(chunk)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        cls = registry.get(name)
        if cls is None:
            errors.append(f"unknown pass {name!r}; valid passes: {', '.join(sorted(registry))}")
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in items:
            if value is None:
                errors.append(f"{name}: option {key!r} needs a value (key=value)")
            elif key not in fields:
                valid = ", ".join(f"{k}={_default(f)}" for k, f in fields.items()) or "none"
                errors.append(f"{name}: unknown option {key!r}; valid options: {valid}")
            elif key in kwargs:
                errors.append(f"{name}: option {key!r} is given more than once ({key}={kwargs[key]}, "
                              f"{key}={parse_value(value)}); give it once")
            else:
                kwargs[key] = parse_value(value)
        try:
            passes.append(cls(**kwargs))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("invalid pipeline: " + "; ".join(errors))
    if not passes:
        raise ConfigError(f"empty pipeline {text!r}; valid passes: {', '.join(sorted(registry))}")
    return passes


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default if f.default is not dataclasses.MISSING else "(required)"
