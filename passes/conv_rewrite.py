"""The convolution-rewrite template ``ConvRewritePass``: a pass that replaces each eligible Conv2d site by a
module that ``build`` returns; selection rules, per-site options, records and errors are handled here.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.passes import Grouped
>>> result = Grouped(groups=2)(trace(torch.nn.Conv2d(4, 8, 3)))
>>> provenance(next(n for n in result.graph_module.graph.nodes if n.op == "call_module"))["pass"]
'grouped'
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import nn

from fxrewrite.errors import ConfigError, FxRewriteError, PassFailure
from fxrewrite.graph.rewriter import PROVENANCE_KEY, finalize, replace_conv
from fxrewrite.graph.select import Rule, Selection, resolve
from fxrewrite.graph.sites import ConvSite, ConvSpec, Reason, find_sites
from fxrewrite.report.report import SiteRecord

from .building import conv_module, meta_weight, replacement_cost
from .costs import Cost, Shape
from .interface import Built, Pass, PassResult

#: Reason codes that mean "this group count cannot be used at this site": an error, not a skip, for a site that a
#: rule names exactly (the user asked for that layer and that count).
GROUP_COUNT_CODES = frozenset({"channels-not-divisible", "groups-incompatible"})
#: ``structure_options`` of a pass whose ``init=random`` builds its structure with torch's default initialisation
RANDOM_INIT: Mapping[str, Any] = MappingProxyType({"init": "random"})


@contextlib.contextmanager
def wrap_site_error(pass_name: str, site: str) -> Iterator[None]:
    """Re-raise anything but an ``FxRewriteError`` as ``PassFailure`` naming the pass and the site (cause chained).

    >>> with wrap_site_error("grouped", "layer1.conv"):  # doctest: +ELLIPSIS
    ...     raise ValueError("boom")
    Traceback (most recent call last):
    fxrewrite.errors.PassFailure: pass 'grouped' failed at site 'layer1.conv': ValueError: boom; ...
    """
    try:
        yield
    except FxRewriteError:
        raise
    except Exception as exc:
        raise PassFailure(f"pass {pass_name!r} failed at site {site!r}: {type(exc).__name__}: {exc}; exclude the "
                          f"site with a selection rule (select=[Rule({site!r}, skip=True)]) or report this as a "
                          "bug") from exc


@dataclass(frozen=True)
class ConvRewritePass(Pass):
    """Template for passes that replace a Conv2d site by cheaper convolutions.

    Subclasses implement ``build`` (the replacement, from the trained weight) and ``check`` (the option-specific
    eligibility), and may set ``kind`` (a structural rewrite kind from ``fxrewrite.graph.sites.REWRITE_KINDS``, whose
    site-level check then runs first) and declare ``cost`` (what the replacement costs, from the shapes alone).
    """

    #: the structural rewrite kind whose site-level check (``ConvSite.reason_for``) applies before ``check``; empty
    #: for a pass whose ``check`` says everything
    kind: ClassVar[str] = ""

    @classmethod
    def eligibility(cls, site: ConvSite) -> Reason | None:
        """The blocker, else the kind-level verdict (``site.reason_for(kind)``), else ``check`` with the default
        options."""
        if site.blocker is not None or cls.kind:
            return site.blocker or site.reason_for(cls.kind)
        try:
            default = cls()
        except (TypeError, ConfigError):  # required options: no default configuration to judge
            return None
        return default.check(site)

    def check(self, site: ConvSite) -> Reason | None:
        """Why this pass, with these options, cannot rewrite ``site`` (None: it can)."""
        return None

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        raise NotImplementedError

    @classmethod
    def cost(cls, spec: ConvSpec, input_shape: Shape, output_shape: Shape, **options: Any) -> Cost:
        """MACs and parameters of the module ``build`` returns for a conv ``spec`` with these input and output
        shapes, with ``options`` (the pass's defaults where not given), from the shapes alone: the one formula of
        this replacement (``fxrewrite.passes.costs``), which budgets price candidates with. Options that set a count
        (a rank) may be numpy integer arrays, giving arrays. A pass that declares it must match ``replacement_cost``
        of what it builds; this default declares nothing (``NotImplementedError``)."""
        raise NotImplementedError(f"pass {cls.name!r} declares no analytic cost")

    def _decide(self, site: ConvSite, selection: Selection) -> tuple[Pass, Reason | None]:
        if not selection.selected:
            return self, Reason("not-selected", "no selection rule includes this site" if selection.rule is None
                                else f"excluded by rule {selection.rule.describe()!r}")
        effective: Pass = self
        if selection.options:
            unknown = sorted(set(selection.options) - set(self.options()))
            if unknown:
                raise ConfigError(f"rule {selection.rule.describe() if selection.rule else ''!r} sets options "
                                  f"{unknown} that pass {self.name!r} does not have; valid: {sorted(self.options())}")
            effective = dataclasses.replace(self, **selection.options)
        reason = site.blocker or (site.reason_for(self.kind) if self.kind else None)
        if reason is None or reason.code == "channels-not-divisible":
            # the kind-level check used default options; the pass re-checks with its actual ones
            reason = effective.check(site)  # type: ignore[attr-defined]
        return effective, reason

    def _sites(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]) -> list[tuple[ConvSite, Pass, Reason | None,
                                                                                   Selection]]:
        """Each site with its effective pass (rule overrides applied), skip reason and selection. Configuration
        errors (unknown options in a rule, a group count that a layer named exactly by a rule cannot use) are raised
        together in one ``ConfigError``."""
        sites = find_sites(gm)
        selections = resolve(rules, sites) if rules else {s.name: Selection(s.name, True, None) for s in sites}
        out = []
        errors: list[str] = []
        bad_groups: list[str] = []
        for site in sites:
            selection = selections[site.name]
            try:
                effective, reason = self._decide(site, selection)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            if reason is not None and reason.code in GROUP_COUNT_CODES and _names_site(selection):
                bad_groups.append(f"{site.name}: {reason.code}: {reason.text.removeprefix(f'{site.name}: ')}")
            if reason is None and getattr(effective, "init", "random") != "random" and meta_weight(gm, site):
                reason = Reason("meta-weight", f"{site.name}: the weight is on the meta device, so there are no "
                                "values to factorise; load real weights first, or use init=random.")
            out.append((site, effective, reason, selection))
        if bad_groups:
            errors.append(f"pass {self.name!r}: a rule names these layers, but their group count cannot be used "
                          f"there: {' '.join(bad_groups)} Give each rule a valid group count, or select the layers "
                          "with a pattern to skip the ones it does not fit")
        if errors:
            raise ConfigError("; ".join(dict.fromkeys(errors)))
        return out

    def validate(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> None:
        self._sites(gm, rules)

    def _record(self, site: ConvSite, effective: Pass, reason: Reason | None, selection: Selection,
                status: str, built: Built | None = None) -> SiteRecord:
        rule = selection.rule.describe() if selection.rule is not None else None
        common = {"site": site.name, "pass_name": self.name, "options": effective.options(), "rule": rule,
                  "params_before": site.params, "macs_before": site.macs if site.output_shape else None}
        if reason is not None:
            return SiteRecord(status="skipped", code=reason.code, reason=reason.text, params_after=site.params,
                              macs_after=common["macs_before"], **common)
        if built is None:
            return SiteRecord(status=status, **common)
        params_after, macs_after = replacement_cost(built.module, site)
        details = {**built.details, "dropped_hooks": site.hooks} if site.hooks else built.details
        return SiteRecord(status=status, params_after=params_after, macs_after=macs_after,
                          rel_error=built.rel_error, exact=built.exact, details=details, **common)

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        records = []
        for site, effective, reason, selection in self._sites(gm, rules):
            built = None
            if reason is None:
                built = self._build(effective, site, gm)
            records.append(self._record(site, effective, reason, selection, "planned", built))
        return records

    def _build(self, effective: Pass, site: ConvSite, gm: torch.fx.GraphModule) -> Built:
        assert isinstance(effective, ConvRewritePass)
        with wrap_site_error(self.name, site.name):
            return effective.build(site, conv_module(gm, site))

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        records = []
        nodes = {n.name: n for n in gm.graph.nodes}
        modified = False
        for site, effective, reason, selection in self._sites(gm, rules):
            if reason is not None:
                records.append(self._record(site, effective, reason, selection, "skipped"))
                continue
            built = self._build(effective, site, gm)
            provenance = {"pass": self.name, "site": site.name, "options": effective.options()}
            with wrap_site_error(self.name, site.name):
                replace_conv(gm, nodes[site.node], built.module, provenance)
            records.append(self._record(site, effective, None, selection, "rewritten", built))
            modified = True
        if modified:
            finalize(gm)
        return PassResult(gm, modified, tuple(records))


def _names_site(selection: Selection) -> bool:
    """Whether the site was selected by a rule that names it exactly (not a pattern, type or global rule)."""
    return selection.selected and selection.rule is not None and selection.rule.form == "exact"


def provenance(node: torch.fx.Node) -> Mapping[str, Any] | None:
    """Which pass and site produced ``node`` (None for original nodes)."""
    return node.meta.get(PROVENANCE_KEY)
