"""Selection: which convolution sites a pass touches, and with which option overrides.

A ``Rule`` matches sites by exact qualified name, glob (``"layer1.*"``), regex (``"re:layer[12]\\..*"`` or a compiled
pattern), module type, or everything (``None``), optionally only sites with at least ``min_channels`` input
channels. Precedence when several rules match one site: **exact name > pattern (glob/regex) > type > global**; among
rules of equal rank the later one wins. The winning rule is shown in the plan. A rule that matches no site is an
error that names the closest site names; with rules given, unmatched sites are skipped as ``not-selected``.

>>> rules = parse_rules(["layer1.*", Rule("layer1.0.conv1", skip=True)])
>>> [r.rank for r in rules]
[2, 3]
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.sites import ConvSite

RANKS = {"exact": 3, "pattern": 2, "type": 1, "global": 0}


@dataclass(frozen=True)
class Rule:
    """Select sites; ``options`` override the pass's options there; ``skip`` excludes them instead."""

    match: str | re.Pattern[str] | type[nn.Module] | None = None
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    skip: bool = False
    min_channels: int = 0

    @property
    def form(self) -> str:
        if self.match is None:
            return "global"
        if isinstance(self.match, type):
            return "type"
        if isinstance(self.match, re.Pattern) or self.match.startswith("re:") or any(c in self.match for c in "*?["):
            return "pattern"
        return "exact"

    @property
    def rank(self) -> int:
        return RANKS[self.form]

    def describe(self) -> str:
        m = self.match
        text = {"global": "*", "type": getattr(m, "__name__", str(m))}.get(self.form)
        if text is None:
            text = f"re:{m.pattern}" if isinstance(m, re.Pattern) else str(m)
        extra = [f"{k}={v}" for k, v in self.options.items()] + (["skip"] if self.skip else [])
        extra += [f"min_channels={self.min_channels}"] if self.min_channels else []
        return text + (f" ({', '.join(extra)})" if extra else "")

    def matches(self, site: ConvSite) -> bool:
        if site.spec.in_channels < self.min_channels:
            return False
        m = self.match
        if m is None:
            return True
        if isinstance(m, type):
            return site.module_type == m.__name__
        if isinstance(m, re.Pattern):
            return m.fullmatch(site.name) is not None
        if m.startswith("re:"):
            return re.fullmatch(m[3:], site.name) is not None
        if self.form == "pattern":
            return fnmatch.fnmatchcase(site.name, m)
        return site.name == m


@dataclass(frozen=True)
class Selection:
    """The outcome for one site: the winning rule (None when no rules were given) and whether it is selected."""

    site: str
    selected: bool
    rule: Rule | None

    @property
    def options(self) -> Mapping[str, Any]:
        return self.rule.options if self.rule is not None else MappingProxyType({})


def parse_rules(select: Iterable[str | re.Pattern[str] | type[nn.Module] | Rule] | str | None) -> list[Rule]:
    """Normalise a user's ``select=`` argument into rules."""
    if select is None:
        return []
    if isinstance(select, str | re.Pattern | type | Rule):
        select = [select]
    rules: list[Rule] = []
    for item in select:
        if isinstance(item, Rule):
            rules.append(item)
        elif isinstance(item, str | re.Pattern) or (isinstance(item, type) and issubclass(item, nn.Module)):
            rules.append(Rule(item))
        else:
            raise ConfigError(f"select entries must be names, globs, regexes, nn.Module types or Rule; got {item!r}")
    return rules


def resolve(rules: Sequence[Rule], sites: Sequence[ConvSite]) -> dict[str, Selection]:
    """Apply ``rules`` to ``sites`` by precedence. Raises ``ConfigError`` listing every rule that matched nothing."""
    if not rules:
        return {s.name: Selection(s.name, True, None) for s in sites}
    unmatched = [r for r in rules if not any(r.matches(s) for s in sites)]
    if unmatched:
        names = [s.name for s in sites]
        lines = []
        for r in unmatched:
            close = difflib.get_close_matches(str(getattr(r.match, "pattern", r.match)), names, n=3, cutoff=0.4)
            lines.append(f"rule {r.describe()!r} matches no convolution site; closest: {', '.join(close) or 'none'}")
        raise ConfigError("; ".join(lines))
    out: dict[str, Selection] = {}
    for site in sites:
        best: Rule | None = None
        for rule in rules:  # later rules of equal rank win
            if rule.matches(site) and (best is None or rule.rank >= best.rank):
                best = rule
        out[site.name] = Selection(site.name, best is not None and not best.skip, best)
    return out
