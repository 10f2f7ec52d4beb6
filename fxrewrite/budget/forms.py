"""Budget forms: the candidate generators a budget chooses among. Passes declare them (``Pass.budget_forms``: form
name -> factory, e.g. ``GroupedBottleneck`` offers ``"tucker2"``), so a pass registered from outside fxrewrite
(``fxrewrite.passes.register``) offers its forms to ``Target`` budgets like the built-in ones. ``make_form`` /
``parse_forms`` read forms from strings in the pipeline grammar (``fxrewrite.passes.pipeline``), such as
``"grouped-separable{groups=4|8, max_rank=16}"``; ``DEFAULT_FORMS`` are used when none are given.

>>> [(f.name, f.pass_name) for f in parse_forms("depthwise-separable, tucker2")]
[('depthwise-separable', 'depthwise-separable'), ('tucker2', 'grouped-bottleneck')]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fxrewrite.errors import ConfigError
from fxrewrite.passes import REGISTRY
from fxrewrite.passes.candidates import Form
from fxrewrite.passes.pipeline import parse_spec, parse_value, split_top

__all__ = ["DEFAULT_FORMS", "form_factories", "form_names", "make_form", "parse_forms"]

DEFAULT_FORMS = ("depthwise-separable", "grouped-separable", "grouped")


def form_factories() -> dict[str, Callable[..., Form]]:
    """Form name -> factory, from the ``budget_forms`` of every registered pass (read now, so passes registered
    later count), in registration order."""
    out: dict[str, Callable[..., Form]] = {}
    for cls in REGISTRY.values():
        for name, factory in cls.budget_forms.items():
            out.setdefault(name, factory)
    return out


def form_names() -> tuple[str, ...]:
    """The names ``make_form`` accepts.

    >>> form_names()
    ('depthwise-separable', 'grouped-separable', 'grouped', 'tucker2')
    """
    return tuple(form_factories())


def _options(factory: Callable[..., Form]) -> dict[str, dataclasses.Field[Any]] | None:
    """The options a dataclass form takes (its init fields but ``name`` / ``pass_name``); None for other factories."""
    if not dataclasses.is_dataclass(factory):
        return None
    return {f.name: f for f in dataclasses.fields(factory) if f.init and f.name not in ("name", "pass_name")}


def _integers(form: str, key: str, value: str) -> tuple[int, ...]:
    values = tuple(parse_value(v) for v in value.split("|"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"budget form {form!r}: {key}={value!r} must be integers")
    return values  # type: ignore[return-value]


def make_form(spec: str | Form) -> Form:
    """A form from its name, optionally with options: ``"grouped-separable{groups=4|8, max_rank=16}"``
    (``|`` separates several values of an option that takes a tuple, such as ``groups``). Form objects pass
    through.

    >>> make_form("grouped{groups=2|4}")
    GroupedForm(groups=(2, 4), name='grouped', pass_name='grouped')
    """
    factories = form_factories()
    if not isinstance(spec, str):
        if isinstance(spec, Form):
            return spec
        raise ConfigError(f"forms must be names ({', '.join(factories)}) or Form objects, got {spec!r}")
    try:
        name, raw = parse_spec(spec)
    except ConfigError as exc:
        raise ConfigError(f"unknown budget form {spec!r} ({exc}); valid: {', '.join(factories)}") from exc
    if name not in factories:
        raise ConfigError(f"unknown budget form {spec!r}; valid: {', '.join(factories)} (options in braces, e.g. "
                          "grouped-separable{groups=4|8})")
    factory = factories[name]
    fields = _options(factory)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if fields is None:  # not a dataclass: its own signature says what it takes
            kwargs[key] = parse_value(value)
            continue
        if key not in fields:
            raise ConfigError(f"budget form {name!r}: unknown option {key!r}; valid: {', '.join(sorted(fields))}")
        values = _integers(name, key, value)
        kwargs[key] = values if str(fields[key].type).startswith("tuple") else values[0]
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"budget form {name!r}: {exc}") from exc


def parse_forms(text: str) -> list[Form]:
    """Forms from a comma-separated list (commas inside braces belong to the options), e.g. the CLI's ``--forms``.

    >>> [f.name for f in parse_forms("depthwise-separable, grouped-separable{groups=4|8, max_rank=16}")]
    ['depthwise-separable', 'grouped-separable']
    """
    forms = [make_form(part) for part in split_top(text)]
    if not forms:
        raise ConfigError(f"no budget forms in {text!r}; valid: {', '.join(form_names())}")
    return forms
