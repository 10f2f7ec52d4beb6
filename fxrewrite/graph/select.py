"""Selection: which convolution sites a pass touches, and with which option overrides.

A ``Rule`` matches sites by exact qualified name, glob (``"layer1.*"``), regex (``"re:layer[12]\\..*"`` or a compiled
pattern), module type (an ``nn.Module`` class, or ``"type:Conv2d"`` from the command line), or everything
(``None``), optionally only sites with at least ``min_channels`` input channels. ``skip=True`` (or a leading ``!`` in
a string, ``"!layer1.*"``) excludes the sites it matches instead.

Precedence when several rules match one site: **exact name > pattern (glob/regex) > type > global**; among rules of
equal rank the later one wins. The winning rule is shown in the plan. A site no rule matches is skipped as
``not-selected``, except when every rule is a skip rule: then the rest are selected. A rule that matches no site is
an error that names the closest site names (or the module types present).

>>> rules = parse_rules(["layer1.*", Rule("layer1.0.conv1", skip=True), "!re:.*downsample.*", "type:Conv2d"])
>>> [(r.form, r.rank, r.skip) for r in rules]
[('pattern', 2, False), ('exact', 3, True), ('pattern', 2, True), ('type', 1, False)]
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import ConvSite, HiddenConv

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
        if isinstance(self.match, type) or (isinstance(self.match, str) and self.match.startswith("type:")):
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
        if m.startswith("type:"):
            return site.module_type == m[5:]
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
    """Normalise a user's ``select=`` argument into rules (a string starting with ``!`` is a skip rule)."""
    if select is None:
        return []
    if isinstance(select, str | re.Pattern | type | Rule):
        select = [select]
    rules: list[Rule] = []
    for item in select:
        if isinstance(item, Rule):
            rules.append(item)
        elif isinstance(item, str):
            text = item.strip()
            skip = text.startswith("!")
            text = text[1:].strip() if skip else text
            if not text or text in ("type:", "re:"):
                raise ConfigError(f"empty selector {item!r}; expected a name, glob, re:REGEX or type:NAME")
            if text.startswith("re:"):
                try:
                    re.compile(text[3:])
                except re.error as exc:
                    raise ConfigError(f"selector {item!r}: invalid regular expression: {exc}") from exc
            rules.append(Rule(text, skip=skip))
        elif isinstance(item, re.Pattern) or (isinstance(item, type) and issubclass(item, nn.Module)):
            rules.append(Rule(item))
        else:
            raise ConfigError(f"select entries must be names, globs, regexes, nn.Module types or Rule; got {item!r}")
    return rules


def _unmatched_text(rule: Rule, sites: Sequence[ConvSite], hidden: Sequence[HiddenConv] = ()) -> str:
    head = f"rule {rule.describe()!r} matches no convolution site"
    named = next((h for h in hidden if rule.form == "exact" and str(rule.match) == h.name), None)
    if named is not None:
        return f"{head}: {named.name} is not a site ({named.reason})"
    if rule.min_channels and any(dataclasses.replace(rule, min_channels=0).matches(s) for s in sites):
        widest = max(s.spec.in_channels for s in sites if dataclasses.replace(rule, min_channels=0).matches(s))
        return f"{head}: the sites it names have at most {widest} input channels (< min_channels={rule.min_channels})"
    if rule.form == "type":
        types = sorted({s.module_type for s in sites})
        return f"{head}; module types present: {', '.join(types) or 'none'}"
    m = rule.match
    text = m.pattern if isinstance(m, re.Pattern) else str(m).removeprefix("re:")
    names = list(dict.fromkeys(s.name for s in sites))
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.4)
    if not close and rule.form == "pattern":  # the literal prefix of a glob/regex, e.g. "layer9" of "layer9.*"
        prefix = re.split(r"[*?\[\\(.|+^$]", text, maxsplit=1)[0]
        close = [n for n in names if prefix and n.startswith(prefix[:-1] or prefix)][:3]
    return f"{head}; closest: {', '.join(close) or 'none'}"


def resolve(rules: Sequence[Rule], sites: Sequence[ConvSite], hidden: Sequence[HiddenConv] = ()
            ) -> dict[str, Selection]:
    """Apply ``rules`` to ``sites`` by precedence. Raises ``ConfigError`` listing every rule that matched nothing;
    a rule naming one of the ``hidden`` convolutions (not sites: not visible, or not 2-d) says why it is not one.

    >>> from fxrewrite.graph.capture import trace
    >>> from fxrewrite.graph.sites import find_sites
    >>> import torch
    >>> sites = find_sites(trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))))
    >>> {k: v.selected for k, v in resolve(parse_rules(["!0"]), sites).items()}
    {'0': False, '1': True}
    """
    if not rules:
        return {s.name: Selection(s.name, True, None) for s in sites}
    unmatched = [r for r in rules if not any(r.matches(s) for s in sites)]
    if unmatched:
        raise ConfigError("; ".join(_unmatched_text(r, sites, hidden) for r in unmatched))
    default_selected = all(r.skip for r in rules)  # only exclusions given: everything else is selected
    out: dict[str, Selection] = {}
    for site in sites:
        best: Rule | None = None
        for rule in rules:  # later rules of equal rank win
            if rule.matches(site) and (best is None or rule.rank >= best.rank):
                best = rule
        selected = default_selected if best is None else not best.skip
        out[site.name] = Selection(site.name, selected, best)
    return out
