"""Grouped rewrite: Conv2d -> Conv2d(groups=g) keeping the block-diagonal blocks of the trained weight.

Output block b keeps the weights that see input block b; the rest is dropped. The kept weight energy
||W_kept||^2 / ||W||^2 is recorded per site (``details["kept_energy"]``) and the relative error is
sqrt(1 - kept). A weight that is already block-diagonal converts exactly. ``init=random`` uses torch's default
initialisation instead.

``permute=true`` first chooses which channels share a group (``fxrewrite.maths.permutation.search``: the groupings
of every rewritten site's input and output channels that keep the most energy, never less than the natural order at
any site) and folds the permutations into the layers around them, so no gather op is added: a permuted channel space is
a component of the channel-coupling graph (``fxrewrite.graph.coupling``); the dense convs writing it reorder their
output channels and bias, its batch norms / PReLUs / depthwise convs their per-channel state, and the dense convs
reading it (the sites among them) their input channels. A component that cannot absorb a permutation exactly (the
model's output, a flatten, a concat, a grouped conv, a residual stream reaching one of these, ...), or that is shared
with a site rewritten with ``permute=false`` or another group count, keeps the natural order. Each site's record
says ``kept_energy`` / ``kept_energy_natural``, ``input_permuted`` / ``output_permuted`` and, for a side kept in
natural order, why (``input_reason`` / ``output_reason``). The rewritten model computes exactly what the grouped
conv on the explicitly permuted channels computes: the only change to the function is the dropped off-block weights.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> gm = trace(torch.nn.Conv2d(8, 16, 3))
>>> Grouped(groups=4)(gm).graph_module.conv.groups
4
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from fxrewrite.graph.coupling import ChannelCoupling, channel_coupling
from fxrewrite.graph.rewriter import permute_channels
from fxrewrite.graph.select import Rule
from fxrewrite.graph.sites import ConvSite, ConvSpec, Reason, check_groups
from fxrewrite.maths import factorize, permutation
from fxrewrite.maths.output_error import SiteStats, grouped_output_error
from fxrewrite.report.report import SiteRecord

from .building import conv_module, make_conv
from .candidates import Candidate, make_candidate
from .conv_rewrite import RANDOM_INIT, ConvRewritePass
from .costs import Cost, Shape, conv_cost, option_values, positions
from .interface import Built, PassResult

INITS = ("block", "random")


@dataclass(frozen=True)
class GroupedForm:
    """Budget form ``grouped``: ``grouped{groups=g}`` for every valid g (or those in ``groups``), block-diagonal
    truncation; the predicted error is the weight energy outside the blocks (or, with calibration statistics, the
    output error of dropping it).

    >>> GroupedForm(groups=(2, 4))
    GroupedForm(groups=(2, 4), name='grouped', pass_name='grouped')
    """

    groups: tuple[int, ...] | None = None
    name: str = "grouped"
    pass_name: str = "grouped"
    calibrated = True  # predicts output errors from calibration statistics

    def candidates(self, site: ConvSite, weight: torch.Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped") is not None:
            return []
        s = site.spec
        i, o, big_g = s.in_channels, s.out_channels, s.groups
        options = self.groups if self.groups is not None else s.valid_groups()
        valid = [g for g in options if g >= 2 and check_groups(site, g, out_divisible=True) is None]
        if not valid:
            return []
        energy = factorize.dense_weight(weight.detach().to(torch.float64), big_g).square().sum(dim=(2, 3))  # O x I
        total = float(energy.sum())
        out = []
        for g in valid:
            if stats is not None:
                err = grouped_output_error(stats, g)
            else:
                kept = float(torch.diagonal(energy.reshape(g, o // g, g, i // g).sum(dim=(1, 3))).sum())
                err = 0.0 if total <= 0.0 else math.sqrt(max(total - kept, 0.0) / total)
            cost = Grouped.cost(s, site.input_shape, site.output_shape, groups=g)
            out.append(make_candidate(self.pass_name, {"groups": g}, cost.macs, cost.params, err))
        return out


@dataclass(frozen=True)
class Grouped(ConvRewritePass):
    """Conv2d -> Conv2d(groups=g) keeping the block diagonal of the trained weight (optionally of a channel
    permutation of it, folded into the neighbouring layers)."""

    name = "grouped"
    description = ("Conv2d -> Conv2d(groups=g), keeping the block-diagonal part of the trained weight; permute=true "
                   "chooses the channel grouping that keeps the most and folds it into neighbouring layers")
    kind = "grouped"
    eligibility_column = "grouped"
    structure_options = RANDOM_INIT
    budget_forms = MappingProxyType({"grouped": GroupedForm})
    groups: int = 4
    init: str = "block"
    permute: bool = False

    def __post_init__(self) -> None:
        self._require(isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups >= 2,
                      f"{self.name}: groups must be an integer >= 2, got {self.groups!r}")
        self._require(self.init in INITS, f"{self.name}: init must be one of {INITS}, got {self.init!r}")
        self._require(isinstance(self.permute, bool), f"{self.name}: permute must be true or false, got "
                      f"{self.permute!r}")

    def spec(self) -> str:
        """As ``Pass.spec``, leaving out ``permute`` when it is off (the spec from before the option existed)."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options().items() if k != "permute" or v)
        return f"{self.name}{{{opts}}}"

    def check(self, site: ConvSite) -> Reason | None:
        return check_groups(site, self.groups, out_divisible=True)

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        if self.init == "block":
            block = factorize.block_diagonal(conv.weight.detach(), source_groups=conv.groups, groups=self.groups)
            weight, rel_error, exact, kept = block.weight, block.rel_error, block.exact, block.kept_energy
        else:
            weight, rel_error, exact, kept = None, None, False, None
        new = make_conv(conv, conv.in_channels, conv.out_channels, groups=self.groups, spatial=True,
                        bias=conv.bias is not None, weight=weight)
        return Built(new, rel_error, exact, {"groups": self.groups, "kept_energy": kept})

    @classmethod
    def cost(cls, spec: ConvSpec, input_shape: Shape, output_shape: Shape, **options: Any) -> Cost:
        """The same conv with ``groups`` groups (a permutation is folded into the neighbours: no cost).

        >>> spec = ConvSpec(8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
        >>> Grouped.cost(spec, (1, 8, 4, 4), (1, 16, 4, 4), groups=4)
        Cost(macs=4608, params=304)
        """
        k = spec.kernel_size[0] * spec.kernel_size[1]
        return conv_cost(positions(output_shape, spec.out_channels), spec.in_channels, spec.out_channels,
                         groups=option_values(cls, options)["groups"], kernel=k, bias=spec.bias)

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        fold = self._fold(gm, rules)
        if fold is None:
            return super().run(gm, rules)
        fold.apply(gm)
        result = super().run(gm, rules)
        return dataclasses.replace(result, records=fold.annotate(result.records))

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        fold = self._fold(gm, rules)
        if fold is None:
            return super().plan(gm, rules)
        folded = copy.deepcopy(gm)  # a dry run changes nothing: the folded weights live on a copy
        fold.apply(folded)
        return list(fold.annotate(tuple(super().plan(folded, rules))))

    def _fold(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]) -> Fold | None:
        """The permutations to fold (None when no site to rewrite asks for them)."""
        rewritten = {site.name: (site, eff) for site, eff, reason, _ in self._sites(gm, rules) if reason is None}
        chosen = {name: s for name, s in rewritten.items()
                  if isinstance(s[1], Grouped) and s[1].permute and s[1].init == "block"}
        if not chosen:
            return None
        return _choose(gm, channel_coupling(gm), rewritten, chosen)


@dataclass(frozen=True)
class Fold:
    """The chosen permutations: per module, the ``(in_perm, out_perm)`` to fold; per site, its record details."""

    modules: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]
    details: Mapping[str, Mapping[str, Any]]

    def apply(self, gm: torch.fx.GraphModule) -> None:
        for name, (in_perm, out_perm) in self.modules.items():
            permute_channels(gm, name, in_perm=in_perm, out_perm=out_perm)

    def annotate(self, records: tuple[SiteRecord, ...]) -> tuple[SiteRecord, ...]:
        return tuple(dataclasses.replace(r, details={**r.details, **self.details[r.site]})
                     if r.site in self.details else r for r in records)


def _choose(gm: torch.fx.GraphModule, coupling: ChannelCoupling, rewritten: Mapping[str, tuple[ConvSite, Any]],
            chosen: Mapping[str, tuple[ConvSite, Grouped]]) -> Fold:
    """Search the groupings of the chosen sites' channel spaces and turn them into per-module permutations."""
    # each side of each chosen site: (site, "input" | "output", component index or None)
    nodes = {n.name: n for n in gm.graph.nodes}
    sides: list[tuple[str, str, int | None]] = []
    for name, (site, _) in chosen.items():
        node = nodes[site.node]
        source = node.args[0] if node.args else node.kwargs.get("input")
        sides.append((name, "input", coupling.index.get(source.name) if isinstance(source, torch.fx.Node) else None))
        sides.append((name, "output", coupling.index.get(site.node)))
    groups_of: dict[int, set[int]] = {}
    for name, _, k in sides:
        if k is not None:
            groups_of.setdefault(k, set()).add(chosen[name][1].groups)
    fixed: dict[int, str] = {}
    for k, gs in groups_of.items():
        comp = coupling.components[k]
        no_permute = [n for n in (*comp.producers, *comp.consumers)
                      if n in rewritten and not getattr(rewritten[n][1], "permute", False)]
        if comp.blockers:
            fixed[k] = comp.why_fixed()
        elif no_permute:
            fixed[k] = f"shared with site {no_permute[0]!r}, rewritten with permute=false"
        elif len(gs) > 1:
            fixed[k] = f"shared by sites rewritten with different groups {sorted(gs)}"
    # search spaces: one per free component; a fixed side (or one without metadata) gets its own natural space
    keys: dict[Any, int] = {}
    spaces: list[permutation.Space] = []

    def space(name: str, side: str, k: int | None) -> int:
        site, eff = chosen[name]
        free = k is not None and k not in fixed
        key = k if free else (name, side)
        if key not in keys:
            keys[key] = len(spaces)
            channels = site.spec.in_channels if side == "input" else site.spec.out_channels
            spaces.append(permutation.Space(channels, eff.groups, free=free))
        return keys[key]

    index = {(name, side): space(name, side, k) for name, side, k in sides}
    terms = [permutation.Term(permutation.energy_matrix(conv_module(gm, site).weight, site.spec.groups),
                              index[(name, "output")], index[(name, "input")]) for name, (site, _) in chosen.items()]
    term_of = {name: j for j, name in enumerate(chosen)}
    found = permutation.search(spaces, terms)
    perms: dict[int, torch.Tensor] = {}
    for k in sorted({k for _, _, k in sides if k is not None and k not in fixed}):
        a = found.assignments[keys[k]]
        perm = permutation.assignment_permutation(a)
        if not torch.equal(perm, torch.arange(len(perm), device=perm.device)):
            perms[k] = perm.cpu()
    modules: dict[str, list[torch.Tensor | None]] = {}
    for k, perm in perms.items():
        comp = coupling.components[k]
        for name in (*comp.producers, *comp.channelwise):
            modules.setdefault(name, [None, None])[1] = perm
        for name in comp.consumers:
            modules.setdefault(name, [None, None])[0] = perm
    details: dict[str, dict[str, Any]] = {}
    for name, side, k in sides:
        d = details.setdefault(name, {"kept_energy_natural": found.kept_natural[term_of[name]]})
        d[f"{side}_permuted"] = k in perms
        if k not in perms:
            why = ("no shape metadata for this tensor (run shape propagation; fxrewrite.rewrite does)" if k is None
                   else fixed.get(k, "no grouping keeps more energy than the natural order"))
            d[f"{side}_reason"] = f"{side} channels: {why}; natural order"
    return Fold({n: (p[0], p[1]) for n, p in modules.items()}, details)
