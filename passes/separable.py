"""Depthwise-separable and grouped-separable rewrites: a grouped kxk conv followed by a 1x1 conv.

Weights come from a per-group truncated SVD of the trained weight (Network Decoupling, Guo et al. 2018): for input
group i, the (O x (I/g)K) slice A_i ~ sum_{j<r} s_j u_j v_j^T; the kxk conv gets sqrt(s_j) v_j, the 1x1 conv
sqrt(s_j) u_j and the bias. Exact when r >= min(O/G, (I/g)K). Depthwise-separable is g = I (r is the depthwise
multiplier). ``init=random`` builds the same structure with torch's default initialisation.

``lowering`` says how a depthwise kxk conv with multiplier T > 1 (groups=I, I*T outputs) is expressed. oneDNN (torch's
CPU conv backend) has a fast depthwise kernel only when each group has one input and one output channel
(``jit_dw`` / ``brdgmm_dw``); with T > 1 it falls back to im2col + GEMM (``gemm:jit``, contiguous) or a blocked
grouped conv padding each 1-in/T-out group to 16x16 (``jit:avx512_core``, channels_last).
``benchmarks/bench_depthwise_lowering.py`` measures the alternatives. ``direct`` emits that conv as is; ``tile``
emits ``ChannelRepeat(T)`` (``torch.cat([x] * T, dim=1)``, which keeps channels_last) then a plain depthwise conv on
I*T channels whose output channel j*I+c is the direct conv's channel c*T+j, with the 1x1 conv's input channels
permuted to match; ``repeat`` emits ``x.repeat_interleave(T, dim=1)`` then the depthwise conv with the direct conv's
channel order (needed when the 1x1 conv is grouped, i.e. the source conv was). All three compute the same function;
the lowering only applies to depthwise sites with T > 1 and otherwise ``direct`` is emitted (``details["lowering"]``
says which one was). The default is ``direct``: on CPU, ``tile`` was 2-7x faster in eager channels_last and for
small maps (256 x 14x14), but not reliably for large maps in contiguous layout nor in onnxruntime at T=4, and
``direct`` keeps the replacement two plain Conv2d modules.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> gm = trace(torch.nn.Conv2d(8, 16, 3, padding=1))
>>> result = DepthwiseSeparable(rank="exact")(gm)
>>> [type(m).__name__ for m in result.graph_module.conv]
['Conv2d', 'Conv2d']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from fxrewrite.graph.rewriter import PROVENANCE_KEY
from fxrewrite.graph.select import Rule, Selection
from fxrewrite.graph.sites import ConvSite, ConvSpec, Reason, check_groups
from fxrewrite.maths import factorize
from fxrewrite.maths.output_error import SiteStats, separable_output_errors
from fxrewrite.maths.spectra import group_spectra, pareto_mask, tail_errors

from .building import make_conv, sequential
from .candidates import Candidate, make_candidate
from .conv_rewrite import RANDOM_INIT, ConvRewritePass
from .costs import Cost, Shape, conv_cost, option_values, positions
from .interface import Built, Pass

INITS = ("svd", "random")
LOWERINGS = ("direct", "tile", "repeat")


class ChannelRepeat(nn.Module):
    """Repeat the channels (dim 1) ``multiplier`` times: tiled (``cat``: c, then c again) or interleaved (each channel
    ``multiplier`` times in a row). No parameters, no MACs; exportable by torch.export and ONNX (Concat / a Tile +
    Reshape)."""

    def __init__(self, multiplier: int, interleave: bool = False) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.interleave = interleave

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleave:
            return x.repeat_interleave(self.multiplier, dim=1)
        return torch.cat([x] * self.multiplier, dim=1)

    def extra_repr(self) -> str:
        return f"multiplier={self.multiplier}, interleave={self.interleave}"


def _effective_lowering(lowering: str, conv: nn.Conv2d, groups: int, rank: int) -> str:
    """The lowering used at a site: ``direct`` unless the kxk conv is depthwise with multiplier > 1; ``tile`` needs
    an ungrouped 1x1 conv (a grouped source conv keeps its groups there), so it becomes ``repeat`` otherwise."""
    if lowering == "direct" or rank == 1 or groups != conv.in_channels:
        return "direct"
    return "repeat" if lowering == "tile" and conv.groups > 1 else lowering


def _lowered(conv: nn.Conv2d, lowering: str, rank: int, spatial_w: torch.Tensor | None,
             pointwise_w: torch.Tensor | None) -> tuple[list[nn.Module], torch.Tensor | None]:
    """The modules in front of the 1x1 conv (repeat + depthwise for ``tile``/``repeat``) and its (permuted) weight."""
    c = conv.in_channels
    if lowering == "tile" and spatial_w is not None and pointwise_w is not None:
        order = torch.arange(c * rank, device=spatial_w.device).view(c, rank).t().reshape(-1)
        spatial_w, pointwise_w = spatial_w[order], pointwise_w[:, order]
    depthwise = make_conv(conv, c * rank, c * rank, groups=c * rank, spatial=True, bias=False, weight=spatial_w)
    return [ChannelRepeat(rank, interleave=lowering == "repeat"), depthwise], pointwise_w


def _check_options(name: str, rank: int | str, init: str, lowering: str) -> None:
    ok = rank == "exact" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)
    ConvRewritePass._require(ok, f"{name}: rank must be a positive integer or 'exact', got {rank!r}")
    ConvRewritePass._require(init in INITS, f"{name}: init must be one of {INITS}, got {init!r}")
    ConvRewritePass._require(lowering in LOWERINGS, f"{name}: lowering must be one of {LOWERINGS}, got {lowering!r}")


def _separable(site: ConvSite, conv: nn.Conv2d, groups: int, rank: int | str, init: str, lowering: str) -> Built:
    g_src = conv.groups
    full = factorize.exact_rank(tuple(conv.weight.shape), g_src, groups)
    r = full if rank == "exact" else int(rank)
    spatial_out = groups * r
    if init == "svd":
        f = factorize.grouped_separable(conv.weight.detach(), source_groups=g_src, groups=groups, rank=r)
        spatial_w, pointwise_w, rel_error, exact = f.spatial, f.pointwise, f.rel_error, f.exact
    else:
        spatial_w = pointwise_w = None
        rel_error, exact = None, False
    used = _effective_lowering(lowering, conv, groups, r)
    if used == "direct":
        front: list[nn.Module] = [make_conv(conv, conv.in_channels, spatial_out, groups=groups, spatial=True,
                                            bias=False, weight=spatial_w, fresh=True)]
    else:
        front, pointwise_w = _lowered(conv, used, r, spatial_w, pointwise_w)
    pointwise = make_conv(conv, spatial_out, conv.out_channels, groups=g_src, spatial=False,
                          bias=conv.bias is not None, weight=pointwise_w, fresh=True)
    details = {"rank": r, "exact_rank": full, "groups": groups, "lowering": used}
    return Built(sequential(*front, pointwise, like=conv), rel_error, exact, details)


def _separable_cost(spec: ConvSpec, output_shape: Shape, groups: Any, rank: Any) -> Cost:
    """The kxk conv (I -> groups * rank, ``groups`` groups; with a lowering, a channel repeat and a depthwise conv
    of the same cost) then the 1x1 conv (groups * rank -> O, the source conv's groups, its bias), both at the output
    resolution. ``rank="exact"``: the exact rank."""
    if isinstance(rank, str):
        weight_shape = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        rank = factorize.exact_rank(weight_shape, spec.groups, groups)
    pix = positions(output_shape, spec.out_channels)
    width = groups * rank
    spatial = conv_cost(pix, spec.in_channels, width, groups=groups, kernel=spec.kernel_size[0] * spec.kernel_size[1])
    return spatial + conv_cost(pix, width, spec.out_channels, groups=spec.groups, kernel=1, bias=spec.bias)


def _rank_reason(site: ConvSite, groups: int, rank: int | str) -> Reason | None:
    if rank == "exact":
        return None
    s = site.spec
    weight_shape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
    full = factorize.exact_rank(weight_shape, s.groups, groups)
    if int(rank) > full:
        return Reason("rank-too-large", f"{site.name}: rank={rank} exceeds the exact rank {full} "
                      f"(min(out_channels/groups, in_channels/{groups} x kernel)); use rank=exact or a smaller rank.")
    return None


def _saving_reason(site: ConvSite, cost: Cost, what: str) -> Reason | None:
    """At a 1x1 conv or one with one input channel per group, where a split saves MACs only at some options (the
    kind-level check admits the site by its cheapest split), the options asked for must save too, unless they ask
    for the exact rank; elsewhere a user may ask for a split that costs more."""
    s = site.spec
    structural = s.kernel_size == (1, 1) or s.in_channels // s.groups == 1
    if what.endswith("rank=exact") or site.output_shape is None or not structural:
        return None
    if int(cost.macs) < site.macs:
        return None
    return Reason("no-saving", f"{site.name}: {what} costs {int(cost.macs):,} MACs, no fewer than the conv's "
                  f"{site.macs:,}; use a lower rank (or fewer groups).")


# ------------------------------------------------------------------------------------------------ budget forms


def _separable_candidates(form: str, site: ConvSite, weight: torch.Tensor, group_counts: Iterable[int],
                          max_rank: int | None, with_groups: bool, stats: SiteStats | None = None
                          ) -> list[Candidate]:
    """Every (group count, rank) of a (grouped-)separable rewrite at ``site`` that no other one dominates in MACs,
    parameters and predicted error (the weight error from the spectra, or the output error from ``stats``)."""
    s = site.spec
    i, o, k, big_g = s.in_channels, s.out_channels, s.kernel_size[0] * s.kernel_size[1], s.groups
    group_counts = list(group_counts)
    if not group_counts:
        return []
    if stats is None:
        total = float(weight.detach().to(torch.float64).square().sum())
        spectra = group_spectra(weight, big_g, group_counts)
    rows, opts = [], []
    for g in group_counts:
        errors = tail_errors(spectra[g], total) if stats is None else separable_output_errors(stats, g)
        full = min(o // big_g, (i // g) * k)
        top = full if max_rank is None else min(full, max_rank)
        r = np.arange(1, top + 1)
        if with_groups:
            cost = GroupedSeparable.cost(s, site.input_shape, site.output_shape, groups=g, rank=r)
        else:
            cost = DepthwiseSeparable.cost(s, site.input_shape, site.output_shape, rank=r)
        err = np.where(r >= full, 0.0, errors[np.minimum(r, len(errors) - 1)])
        rows.append(np.stack([cost.macs, cost.params, err], axis=1).astype(np.float64))
        opts.extend((g, int(x)) for x in r)
    a = np.concatenate(rows)
    out = []
    for j in np.flatnonzero(pareto_mask(a)):
        g, r = opts[j]
        out.append(make_candidate(form, {"groups": g, "rank": r} if with_groups else {"rank": r}, int(a[j, 0]),
                                  int(a[j, 1]), float(a[j, 2])))
    return out


@dataclass(frozen=True)
class DepthwiseSeparableForm:
    """Budget form ``depthwise-separable``: ``depthwise-separable{rank=T}`` for T = 1 .. the exact rank (or
    ``max_rank``).

    >>> DepthwiseSeparableForm(max_rank=2)
    DepthwiseSeparableForm(max_rank=2, name='depthwise-separable', pass_name='depthwise-separable')
    """

    max_rank: int | None = None
    name: str = "depthwise-separable"
    pass_name: str = "depthwise-separable"
    calibrated = True  # predicts output errors from calibration statistics

    def candidates(self, site: ConvSite, weight: torch.Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("depthwise-separable") is not None:
            return []
        return _separable_candidates(self.pass_name, site, weight, [site.spec.in_channels], self.max_rank, False,
                                     stats)


@dataclass(frozen=True)
class GroupedSeparableForm:
    """Budget form ``grouped-separable``: ``grouped-separable{groups=g, rank=r}`` for every valid g (or those in
    ``groups``) from the conv's own group count (g = 1 at a dense conv: a rank-r split) below in_channels (g =
    in_channels is depthwise-separable, offered here too where it is the only one: one input channel) and r = 1 ..
    the exact rank (or ``max_rank``); candidates that save neither MACs nor parameters are dropped by the budget."""

    groups: tuple[int, ...] | None = None
    max_rank: int | None = None
    name: str = "grouped-separable"
    pass_name: str = "grouped-separable"
    calibrated = True

    def candidates(self, site: ConvSite, weight: torch.Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or site.reason_for("grouped-separable") is not None:
            return []
        s = site.spec
        # the conv's own group count (1: a plain rank-r split of the dense conv) up to in_channels, which is the
        # depthwise-separable form, offered here only where it is the one group count (one input channel)
        top = s.in_channels + 1 if s.in_channels == s.groups else s.in_channels
        options = self.groups if self.groups is not None else range(s.groups, top)
        valid = [g for g in options if g >= 1 and check_groups(site, g, out_divisible=False) is None]
        return _separable_candidates(self.pass_name, site, weight, valid, self.max_rank, True, stats)


# ------------------------------------------------------------------------------------------------------ passes

#: the passes whose replacements are separable splits: a conv one of them built is not split again by either
PASS_NAMES = ("depthwise-separable", "grouped-separable")


def _already_split(site: ConvSite, nodes: Mapping[str, torch.fx.Node]) -> Reason | None:
    node = nodes.get(site.node)
    provenance = (node.meta.get(PROVENANCE_KEY) or {}) if node is not None else {}
    if provenance.get("pass") not in PASS_NAMES:
        return None
    return Reason("already-separable", f"{site.name}: built by {provenance['pass']} as part of its split of "
                  f"{provenance.get('site')!r}; splitting a piece of a separable split again only adds convolutions.")


class _SeparableSites:
    """Skips the convs a separable pass built (``already-separable``), so running a pipeline twice changes nothing
    the second time; needs the graph, so it hooks ``ConvRewritePass._sites``."""

    def _sites(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]
               ) -> list[tuple[ConvSite, Pass, Reason | None, Selection]]:
        out = []
        nodes = {n.name: n for n in gm.graph.nodes}  # indexed once: a scan per site is quadratic in the graph
        for site, effective, reason, selection in super()._sites(gm, rules):  # type: ignore[misc]
            if reason is None:
                reason = _already_split(site, nodes)
            out.append((site, effective, reason, selection))
        return out



@dataclass(frozen=True)
class DepthwiseSeparable(_SeparableSites, ConvRewritePass):
    """Conv2d -> depthwise kxk (groups=I, I*rank outputs) + pointwise 1x1; rank='exact' reproduces the original."""

    name = "depthwise-separable"
    description = "Conv2d -> depthwise kxk (multiplier rank) + 1x1, from a per-input-channel SVD of the weight"
    kind = "depthwise-separable"
    eligibility_column = "dw-sep"
    structure_options = RANDOM_INIT
    budget_forms = MappingProxyType({"depthwise-separable": DepthwiseSeparableForm})
    rank: int | str = 1
    init: str = "svd"
    lowering: str = "direct"

    def __post_init__(self) -> None:
        _check_options(self.name, self.rank, self.init, self.lowering)

    def check(self, site: ConvSite) -> Reason | None:
        return _rank_reason(site, site.spec.in_channels, self.rank) or _saving_reason(
            site, self.cost(site.spec, site.input_shape, site.output_shape, rank=self.rank), f"rank={self.rank}")

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        return _separable(site, conv, conv.in_channels, self.rank, self.init, self.lowering)

    @classmethod
    def cost(cls, spec: ConvSpec, input_shape: Shape, output_shape: Shape, **options: Any) -> Cost:
        """Depthwise kxk (I -> I * rank) then 1x1 (I * rank -> O), both at the output resolution.

        >>> spec = ConvSpec(8, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
        >>> DepthwiseSeparable.cost(spec, (1, 8, 4, 4), (1, 16, 4, 4), rank=2)
        Cost(macs=6400, params=416)
        """
        return _separable_cost(spec, output_shape, spec.in_channels, option_values(cls, options)["rank"])


@dataclass(frozen=True)
class GroupedSeparable(_SeparableSites, ConvRewritePass):
    """Conv2d -> grouped kxk (groups g, rank outputs per group) + 1x1, from a per-group SVD of the weight."""

    name = "grouped-separable"
    description = "Conv2d -> grouped kxk (g groups, rank outputs each) + 1x1, from a per-group SVD of the weight"
    kind = "grouped-separable"
    eligibility_column = "grouped-sep"
    structure_options = RANDOM_INIT
    budget_forms = MappingProxyType({"grouped-separable": GroupedSeparableForm})
    groups: int = 4
    rank: int | str = 4
    init: str = "svd"
    lowering: str = "direct"

    def __post_init__(self) -> None:
        _check_options(self.name, self.rank, self.init, self.lowering)
        self._require(isinstance(self.groups, int) and self.groups >= 1,
                      f"{self.name}: groups must be a positive integer, got {self.groups!r}")

    def check(self, site: ConvSite) -> Reason | None:
        return (check_groups(site, self.groups, out_divisible=False) or _rank_reason(site, self.groups, self.rank)
                or _saving_reason(site, self.cost(site.spec, site.input_shape, site.output_shape, groups=self.groups,
                                                  rank=self.rank), f"groups={self.groups}, rank={self.rank}"))

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        return _separable(site, conv, self.groups, self.rank, self.init, self.lowering)

    @classmethod
    def cost(cls, spec: ConvSpec, input_shape: Shape, output_shape: Shape, **options: Any) -> Cost:
        """Grouped kxk (I -> groups * rank, ``groups`` groups) then 1x1 (groups * rank -> O), both at the output
        resolution."""
        opts = option_values(cls, options)
        return _separable_cost(spec, output_shape, opts["groups"], opts["rank"])
