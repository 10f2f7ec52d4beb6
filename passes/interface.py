"""The pass interface: ``Pass`` (a frozen dataclass whose fields are its options), ``PassResult`` and ``Built``.

A pass is a frozen dataclass whose fields are its typed options and whose ``name`` is its CLI name. Calling a pass
on a GraphModule returns a ``PassResult(graph_module, modified, records)``, which torch's own
``torch.fx.passes.infra.pass_manager.PassManager`` accepts (it reads ``graph_module`` and ``modified``).

>>> from fxrewrite.passes import Grouped
>>> Grouped(groups=2).spec(), Grouped.name
('grouped{groups=2, init=block}', 'grouped')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.select import Rule, resolve
from fxrewrite.graph.sites import ConvSite, Reason, find_sites
from fxrewrite.report.report import SiteRecord


@dataclass(frozen=True)
class PassResult:
    """What a pass returns; duck-compatible with ``torch.fx.passes.infra.pass_base.PassResult``."""

    graph_module: torch.fx.GraphModule
    modified: bool
    records: tuple[SiteRecord, ...] = ()


@dataclass(frozen=True)
class Pass:
    """Base of all passes. Subclasses set ``name`` and ``description`` and declare options as fields; what the rest
    of fxrewrite needs to know about a pass is declared here, on the class, and read through the registry
    (``fxrewrite.passes.register``)."""

    #: the CLI name (``"grouped"`` in ``"grouped{groups=4}"``): unique among the registered passes
    name: ClassVar[str] = ""
    #: one line for ``fxrewrite passes``
    description: ClassVar[str] = ""
    #: the candidate generators this pass offers budgets, by form name (``Target(...)``'s ``forms=``): each maps a
    #: form's options to an object with ``candidates(site, weight, stats=None)`` (``fxrewrite.passes.candidates``)
    budget_forms: ClassVar[Mapping[str, Callable[..., Any]]] = MappingProxyType({})
    #: option values that build the same structure without computing weights (e.g. ``{"init": "random"}``):
    #: ``apply_plan`` / ``load_rewritten`` rebuild a saved rewrite with them, then load the saved weights
    structure_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: header of this pass's column in the dry-run eligibility table (``fxrewrite plan`` without passes), whose
    #: cells are ``eligibility(site)``; empty: no column
    eligibility_column: ClassVar[str] = ""

    @classmethod
    def eligibility(cls, site: ConvSite) -> Reason | None:
        """Whether this pass, with its default options, could rewrite ``site``: None, or the reason it could not.
        This base only knows the site's blocker (what stops every rewrite)."""
        return site.blocker

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        return self.run(gm)

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        raise NotImplementedError

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        """The per-site decisions ``run`` would take, without changing anything."""
        raise NotImplementedError

    def validate(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> None:
        """Raise ``ConfigError`` for what ``run`` would refuse as misconfigured (here: rules that match no site),
        without building or changing anything."""
        if rules:
            resolve(rules, find_sites(gm))

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pipeline-string form of this pass: ``name{k=v, ...}``."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"{self.name}{{{opts}}}" if opts else self.name

    @staticmethod
    def _require(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)


@dataclass(frozen=True)
class Built:
    """A replacement for one convolution and what it costs / loses (weight-space error from the factorisation)."""

    module: nn.Module
    rel_error: float | None  # None when the new weights are a fresh initialisation (init=random)
    exact: bool
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)
