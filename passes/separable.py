"""Depthwise-separable and grouped-separable rewrites: a grouped kxk conv followed by a 1x1 conv.

Weights come from a per-group truncated SVD of the trained weight (Network Decoupling, Guo et al. 2018): for input
group i, the (O x (I/g)K) slice A_i ~ sum_{j<r} s_j u_j v_j^T; the kxk conv gets sqrt(s_j) v_j, the 1x1 conv
sqrt(s_j) u_j and the bias. Exact when r >= min(O/G, (I/g)K). Depthwise-separable is g = I (r is the depthwise
multiplier). ``init=random`` builds the same structure with torch's default initialisation.

>>> import torch
>>> from fxrewrite.capture import trace
>>> gm = trace(torch.nn.Conv2d(8, 16, 3, padding=1))
>>> result = DepthwiseSeparable(rank="exact")(gm)
>>> [type(m).__name__ for m in result.graph_module.conv]
['Conv2d', 'Conv2d']
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fxrewrite import factorize
from fxrewrite.sites import ConvSite, Reason, check_groups

from .base import Built, ConvRewritePass, make_conv, sequential

INITS = ("svd", "random")


def _check_rank_option(name: str, rank: int | str) -> None:
    ok = rank == "exact" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1)
    ConvRewritePass._require(ok, f"{name}: rank must be a positive integer or 'exact', got {rank!r}")


def _separable(site: ConvSite, conv: nn.Conv2d, groups: int, rank: int | str, init: str) -> Built:
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
    spatial = make_conv(conv, conv.in_channels, spatial_out, groups=groups, spatial=True, bias=False,
                        weight=spatial_w)
    pointwise = make_conv(conv, spatial_out, conv.out_channels, groups=g_src, spatial=False,
                          bias=conv.bias is not None, weight=pointwise_w)
    details = {"rank": r, "exact_rank": full, "groups": groups}
    return Built(sequential(spatial, pointwise, like=conv), rel_error, exact, details)


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


@dataclass(frozen=True)
class DepthwiseSeparable(ConvRewritePass):
    """Conv2d -> depthwise kxk (groups=I, I*rank outputs) + pointwise 1x1; rank='exact' reproduces the original."""

    name = "depthwise-separable"
    description = "Conv2d -> depthwise kxk (multiplier rank) + 1x1, from a per-input-channel SVD of the weight"
    kind = "depthwise-separable"
    rank: int | str = 1
    init: str = "svd"

    def __post_init__(self) -> None:
        _check_rank_option(self.name, self.rank)
        self._require(self.init in INITS, f"{self.name}: init must be one of {INITS}, got {self.init!r}")

    def check(self, site: ConvSite) -> Reason | None:
        return _rank_reason(site, site.spec.in_channels, self.rank)

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        return _separable(site, conv, conv.in_channels, self.rank, self.init)


@dataclass(frozen=True)
class GroupedSeparable(ConvRewritePass):
    """Conv2d -> grouped kxk (groups g, rank outputs per group) + 1x1, from a per-group SVD of the weight."""

    name = "grouped-separable"
    description = "Conv2d -> grouped kxk (g groups, rank outputs each) + 1x1, from a per-group SVD of the weight"
    kind = "grouped-separable"
    groups: int = 4
    rank: int | str = 4
    init: str = "svd"

    def __post_init__(self) -> None:
        _check_rank_option(self.name, self.rank)
        self._require(isinstance(self.groups, int) and self.groups >= 1,
                      f"{self.name}: groups must be a positive integer, got {self.groups!r}")
        self._require(self.init in INITS, f"{self.name}: init must be one of {INITS}, got {self.init!r}")

    def check(self, site: ConvSite) -> Reason | None:
        if self.groups == site.spec.groups:
            return Reason("already-grouped", f"{site.name}: already has groups={self.groups}; a grouped-separable "
                          "split needs more groups than the conv has.")
        return check_groups(site, self.groups, out_divisible=False) or _rank_reason(site, self.groups, self.rank)

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        return _separable(site, conv, self.groups, self.rank, self.init)
