"""Bottleneck rewrites: Conv2d -> 1x1 (I -> R) -> kxk on R channels (depthwise or grouped) -> 1x1 (R -> O).

``depthwise-bottleneck{rank=R}`` is the CP form (MobileNetV2's linear bottleneck): R rank-1 terms, a depthwise kxk
conv on R channels. ``grouped-bottleneck{groups=g, rank=R}`` is the block-term form (ResNeXt's block): a grouped kxk
conv with g groups of R/g channels; ``groups=1`` is Tucker-2 and ``groups=R`` the depthwise bottleneck. Weights are
fitted to the trained weight by ``fxrewrite.maths.bottleneck_fit`` (closed-form start, then alternating least squares to
``tol`` / ``max_iter``); ``rank=exact`` (or any rank at least the exact rank) reproduces the conv. The kxk conv keeps
the original's kernel, stride, padding, dilation and padding_mode; the 1x1 convs have none of them (the first has no
bias, so zero padding commutes with it); the bias goes on the last conv. ``tol=auto`` is the fit's default
(``bottleneck_fit.TUCKER_TOL`` for Tucker-2, ``ALS_TOL`` otherwise). ``init=random`` builds the same structure with
torch's default initialisation. The weight-space relative error, the sweeps run and whether ALS converged are recorded
per site.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> gm = trace(torch.nn.Conv2d(8, 16, 3, padding=1))
>>> result = GroupedBottleneck(groups=2, rank=8, max_iter=3)(gm)
>>> [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in result.graph_module.conv]
[(8, 8, (1, 1), 1), (8, 8, (3, 3), 2), (8, 16, (1, 1), 1)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from fxrewrite.graph.rewriter import PROVENANCE_KEY
from fxrewrite.graph.select import Rule, Selection
from fxrewrite.graph.sites import ConvSite, ConvSpec, Reason
from fxrewrite.maths import bottleneck_fit
from fxrewrite.maths.factorize import dense_weight
from fxrewrite.maths.output_error import SiteStats, tucker2_output_errors

from .building import make_conv, sequential
from .candidates import Candidate, make_candidate
from .conv_rewrite import RANDOM_INIT, ConvRewritePass
from .costs import Cost, Shape, conv_cost, option_values, positions
from .interface import Built, Pass

INITS = ("svd", "random")
PASS_NAMES = ("depthwise-bottleneck", "grouped-bottleneck")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_pointwise(node: object, gm: torch.fx.GraphModule, *, bias_ok: bool) -> bool:
    if not (isinstance(node, torch.fx.Node) and node.op == "call_module"):
        return False
    module = gm.get_submodule(str(node.target))
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1 and (bias_ok or module.bias is None))


def bottleneck_core(gm: torch.fx.GraphModule, site: ConvSite) -> bool:
    """Whether ``site`` is already the kxk core of a bottleneck: produced by a bottleneck pass (provenance), or fed
    only by a bias-free 1x1 conv and feeding only a 1x1 conv (the structure these passes build)."""
    node = next((n for n in gm.graph.nodes if n.name == site.node), None)
    if node is None:
        return False
    provenance = node.meta.get(PROVENANCE_KEY) or {}
    if provenance.get("pass") in PASS_NAMES:
        return True
    producer = node.args[0] if node.args else None
    users = list(node.users)
    return (isinstance(producer, torch.fx.Node) and len(producer.users) == 1
            and _is_pointwise(producer, gm, bias_ok=False) and len(users) == 1
            and _is_pointwise(users[0], gm, bias_ok=True))


def _bottleneck_cost(spec: ConvSpec, input_shape: Shape, output_shape: Shape, groups: Any, rank: Any) -> Cost:
    """The 1x1 conv (I -> rank) at the input resolution, then the kxk conv (rank -> rank, ``groups`` groups; None:
    depthwise) and the 1x1 conv (rank -> O, the bias) at the output resolution. ``rank="exact"``: the exact rank."""
    i, o = spec.in_channels, spec.out_channels
    if isinstance(rank, str):
        rank = bottleneck_fit.exact_rank((o, i // spec.groups, *spec.kernel_size), groups, source_groups=spec.groups)
    pix_in, pix_out = positions(input_shape, i), positions(output_shape, o)
    core = conv_cost(pix_out, rank, rank, groups=rank if groups is None else groups,
                     kernel=spec.kernel_size[0] * spec.kernel_size[1])
    return (conv_cost(pix_in, i, rank, groups=1, kernel=1) + core
            + conv_cost(pix_out, rank, o, groups=1, kernel=1, bias=spec.bias))


def _exact_rank(site: ConvSite, groups: int | None) -> int:
    s = site.spec
    shape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
    return bottleneck_fit.exact_rank(shape, groups, source_groups=s.groups)


def _build(conv: nn.Conv2d, groups: int | None, rank: int | str, init: str, tol: float | str, max_iter: int
           ) -> Built:
    """``groups=None``: depthwise (groups = rank); ``tol="auto"``: the fit's default for the form."""
    full = bottleneck_fit.exact_rank(tuple(conv.weight.shape), groups, source_groups=conv.groups)
    r = full if rank == "exact" else int(rank)
    g = r if groups is None else groups
    details: dict[str, object] = {"rank": r, "groups": g, "exact_rank": full}
    if init == "svd":
        fit = bottleneck_fit.block_term(conv.weight.detach(), g, r, source_groups=conv.groups,
                                        tol=None if tol == "auto" else float(tol), max_iter=max_iter)
        weights: tuple[torch.Tensor | None, ...] = (fit.first, fit.core, fit.last)
        rel_error, exact = fit.rel_error, fit.exact
        details |= {"init_rel_error": fit.init_rel_error, "iterations": fit.iterations, "converged": fit.converged}
    else:
        weights, rel_error, exact = (None, None, None), None, False
    first = make_conv(conv, conv.in_channels, r, groups=1, spatial=False, bias=False, weight=weights[0])
    core = make_conv(conv, r, r, groups=g, spatial=True, bias=False, weight=weights[1])
    last = make_conv(conv, r, conv.out_channels, groups=1, spatial=False, bias=conv.bias is not None,
                     weight=weights[2])
    return Built(sequential(first, core, last, like=conv), rel_error, exact, details)


def structural_reason(site: ConvSite) -> Reason | None:
    """Why no bottleneck form applies at ``site`` whatever its options (None: it applies). 1x1 kernels and depthwise
    convs are not bottleneck material (below); a conv with one input channel per group is a candidate where the
    cheapest bottleneck (rank 1: 1x1 I -> 1, a 1-channel kxk, 1x1 1 -> O), by the pass's own cost formula, costs
    fewer MACs than the conv (parameters where shapes are unknown), like an audio stem ``Conv2d(1, C, (K, 1))``."""
    s = site.spec
    if s.kernel_size == (1, 1):
        return Reason("pointwise-kernel", "1x1 kernel: the bottleneck forms factor a conv around its kxk core, and a "
                      "1x1 conv has none; its low-rank forms are grouped-separable{groups=g, rank=r} (g=1: a plain "
                      "rank-r split).")
    if s.is_depthwise:
        return Reason("already-depthwise", f"groups={s.groups} equals in_channels: a depthwise conv never mixes "
                      "channels, and the bottleneck forms (1x1 convs around the kxk core) would mix them; they "
                      "are not fitted to depthwise convs.")
    if s.in_channels // s.groups > 1:
        return None  # eligible as before, even where it costs more: a user may ask for an exact rewrite
    cheapest = _bottleneck_cost(s, site.input_shape, site.output_shape, 1, 1)
    known = site.output_shape is not None and site.input_shape is not None
    if (cheapest.macs >= site.macs) if known else (cheapest.params >= site.params):
        what = "MACs" if known else "parameters"
        low, conv = (int(cheapest.macs), site.macs) if known else (int(cheapest.params), site.params)
        return Reason("no-saving", f"the cheapest bottleneck (rank 1) costs {low:,} {what}, no fewer than the "
                      f"conv's {conv:,}.")
    return None


@dataclass(frozen=True)
class _Bottleneck(ConvRewritePass):
    """Shared validation, the structural check (``structural_reason``: by cost, not by shape class) and the
    already-a-bottleneck check (which needs the graph, so it hooks ``_sites``)."""

    structure_options = RANDOM_INIT

    def _validate(self, rank: int | str, init: str, tol: float | str, max_iter: int) -> None:
        self._require(rank == "exact" or _is_positive_int(rank),
                      f"{self.name}: rank must be a positive integer or 'exact', got {rank!r}")
        self._require(init in INITS, f"{self.name}: init must be one of {INITS}, got {init!r}")
        self._require(tol == "auto" or (isinstance(tol, int | float) and not isinstance(tol, bool) and tol >= 0),
                      f"{self.name}: tol must be a number >= 0 or 'auto', got {tol!r}")
        self._require(isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 0,
                      f"{self.name}: max_iter must be an integer >= 0, got {max_iter!r}")

    def _rank_reason(self, site: ConvSite, groups: int | None, rank: int | str) -> Reason | None:
        structural = structural_reason(site)
        if structural is not None or rank == "exact":
            return structural
        full = _exact_rank(site, groups)
        if int(rank) > full:
            return Reason("rank-too-large", f"{site.name}: rank={rank} exceeds the exact rank {full} of this "
                          f"{self.name} (at that rank the fit is already exact); use rank=exact or a smaller rank.")
        return None

    def _sites(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]
               ) -> list[tuple[ConvSite, Pass, Reason | None, Selection]]:
        out = []
        for site, effective, reason, selection in super()._sites(gm, rules):
            if reason is None and bottleneck_core(gm, site):
                reason = Reason("already-bottleneck", f"{site.name}: already the kxk core of a 1x1 -> kxk -> 1x1 "
                                "bottleneck; factorising it again would only add convolutions.")
            out.append((site, effective, reason, selection))
        return out


@dataclass(frozen=True)
class DepthwiseBottleneck(_Bottleneck):
    """Conv2d -> 1x1 (I -> rank) -> depthwise kxk on rank channels -> 1x1 (rank -> O): a CP fit of the weight."""

    name = "depthwise-bottleneck"
    description = "Conv2d -> 1x1 (I->R) -> depthwise kxk (R) -> 1x1 (R->O), a CP fit (ALS) of the trained weight"
    rank: int | str = 16
    init: str = "svd"
    tol: float | str = "auto"
    max_iter: int = bottleneck_fit.DEFAULT_MAX_ITER

    def __post_init__(self) -> None:
        self._validate(self.rank, self.init, self.tol, self.max_iter)

    def check(self, site: ConvSite) -> Reason | None:
        return self._rank_reason(site, None, self.rank)

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        return _build(conv, None, self.rank, self.init, self.tol, self.max_iter)

    @classmethod
    def cost(cls, spec: ConvSpec, input_shape: Shape, output_shape: Shape, **options: Any) -> Cost:
        """1x1 (I -> rank) at the input resolution, depthwise kxk on rank channels and 1x1 (rank -> O) at the
        output resolution."""
        return _bottleneck_cost(spec, input_shape, output_shape, None, option_values(cls, options)["rank"])


@dataclass(frozen=True)
class Tucker2Form:
    """Budget form ``tucker2`` (opt-in): ``grouped-bottleneck{groups=1, rank=R}`` (Tucker-2: 1x1 I->R, kxk R->R,
    1x1 R->O) for R = 1 .. the exact rank (or ``max_rank``). The predicted error is that of the truncated HOSVD
    (top-R left singular vectors of the mode-O and mode-I unfoldings, core = projection); the pass starts from the
    sequentially truncated HOSVD and refines it with HOOI, which in practice ends at or below that (it is not a
    proven bound). The first 1x1 runs at the input resolution (strided convs). With calibration statistics the error
    is that HOSVD's output error; at grouped convs it is not offered then (the dense candidate's output error needs
    the cross-group input statistics).

    >>> Tucker2Form(max_rank=8)
    Tucker2Form(max_rank=8, name='tucker2', pass_name='grouped-bottleneck')
    """

    max_rank: int | None = None
    name: str = "tucker2"
    pass_name: str = "grouped-bottleneck"
    calibrated = True  # predicts output errors from calibration statistics

    def candidates(self, site: ConvSite, weight: torch.Tensor, stats: SiteStats | None = None) -> list[Candidate]:
        if site.blocker is not None or structural_reason(site) is not None:
            return []
        if stats is not None and site.spec.groups > 1:
            return []
        s = site.spec
        i, o, k, big_g = s.in_channels, s.out_channels, s.kernel_size[0] * s.kernel_size[1], s.groups
        w = dense_weight(weight.detach().to(torch.float64), big_g).reshape(o, i, k)
        total = float(w.square().sum())
        mode_o, mode_i = w.reshape(o, i * k), w.transpose(0, 1).reshape(i, o * k)
        u = torch.linalg.eigh(mode_o @ mode_o.mT).eigenvectors.flip(-1)  # descending
        v = torch.linalg.eigh(mode_i @ mode_i.mT).eigenvectors.flip(-1)
        core = torch.einsum("oik,op,iq->pqk", w, u, v).square().sum(dim=-1)  # energy per (mode-O, mode-I) pair
        kept = core.cumsum(0).cumsum(1)  # kept[a, b]: energy of the top a+1 x b+1 core
        full = max(min(o, i * k), min(i, o * k))
        top = full if self.max_rank is None else min(full, self.max_rank)
        costs = GroupedBottleneck.cost(s, site.input_shape, site.output_shape, groups=1, rank=np.arange(1, top + 1))
        out = []
        calibrated = tucker2_output_errors(stats, u, v, range(1, top + 1)) if stats is not None else None
        for r in range(1, top + 1):
            energy = float(kept[min(r, o) - 1, min(r, i) - 1])
            err = 0.0 if r >= full or total <= 0.0 else math.sqrt(min(max(total - energy, 0.0) / total, 1.0))
            if calibrated is not None:
                err = 0.0 if r >= full else calibrated[r - 1]
            out.append(make_candidate(self.pass_name, {"groups": 1, "rank": r}, costs.macs[r - 1], costs.params[r - 1],
                                      err))
        return out


@dataclass(frozen=True)
class GroupedBottleneck(_Bottleneck):
    """Conv2d -> 1x1 (I -> rank) -> grouped kxk (rank -> rank, groups) -> 1x1 (rank -> O): a block-term fit
    (groups=1: Tucker-2; groups=rank: the depthwise bottleneck)."""

    name = "grouped-bottleneck"
    description = ("Conv2d -> 1x1 (I->R) -> grouped kxk (R->R, g groups) -> 1x1 (R->O), a block-term fit "
                   "(g=1: Tucker-2) of the trained weight")
    budget_forms = MappingProxyType({"tucker2": Tucker2Form})
    groups: int = 4
    rank: int | str = 16
    init: str = "svd"
    tol: float | str = "auto"
    max_iter: int = bottleneck_fit.DEFAULT_MAX_ITER

    def __post_init__(self) -> None:
        self._validate(self.rank, self.init, self.tol, self.max_iter)
        self._require(_is_positive_int(self.groups), f"{self.name}: groups must be a positive integer, "
                      f"got {self.groups!r}")
        self._require(self.rank == "exact" or int(self.rank) % self.groups == 0,
                      f"{self.name}: groups={self.groups} must divide rank={self.rank} (the kxk conv has rank "
                      "channels in groups groups); pick a rank that is a multiple of groups")

    def check(self, site: ConvSite) -> Reason | None:
        return self._rank_reason(site, self.groups, self.rank)

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        return _build(conv, self.groups, self.rank, self.init, self.tol, self.max_iter)

    @classmethod
    def cost(cls, spec: ConvSpec, input_shape: Shape, output_shape: Shape, **options: Any) -> Cost:
        """1x1 (I -> rank) at the input resolution, grouped kxk (rank -> rank, ``groups`` groups) and 1x1 (rank ->
        O) at the output resolution; a strided conv's first 1x1 runs at the larger input resolution.

        >>> spec = ConvSpec(8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1, False)
        >>> GroupedBottleneck.cost(spec, (1, 8, 8, 8), (1, 16, 4, 4), groups=1, rank=4)
        Cost(macs=5376, params=240)
        """
        opts = option_values(cls, options)
        return _bottleneck_cost(spec, input_shape, output_shape, opts["groups"], opts["rank"])
