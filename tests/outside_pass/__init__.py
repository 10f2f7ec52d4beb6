"""A pass defined outside fxrewrite, on its public pass interface only: ``spatial-separable``.

Conv(I, O, kh x kw) -> Conv(I, r, (kh, 1)) then Conv(r, O, (1, kw)), with weights from the truncated SVD of the
weight rearranged as an (I*kh) x (O*kw) matrix M[(i, a), (o, b)] = W[o, i, a, b]: M ~ sum_{j<r} s_j u_j v_j^T, the
vertical conv gets sqrt(s_j) u_j, the horizontal one sqrt(s_j) v_j and the bias. Exact when r >= min(I*kh, O*kw).
The vertical conv takes the stride, padding and dilation along the height, the horizontal one those along the width
(both keep the padding mode: padding is separable, and a per-column conv commutes with padding columns). Grouped
convs and kernels with a side of 1 are declined with a reason.

This module registers nothing when imported: the tests install it as a distribution whose ``entry_points.txt``
declares it in the ``fxrewrite.passes`` group, and fxrewrite finds it through ``importlib.metadata``.

>>> import torch
>>> from torch import nn
>>> conv = nn.Conv2d(3, 4, (3, 5), padding=(1, 2))
>>> built = SpatialSeparable(rank="exact").build(None, conv)
>>> [(c.kernel_size, c.padding) for c in built.module], built.exact
([((3, 1), (1, 0)), ((1, 5), (0, 2))], True)
>>> x = torch.randn(1, 3, 8, 8)
>>> torch.testing.assert_close(built.module(x), conv(x), rtol=1e-4, atol=1e-5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import ConvSite, ConvSpec, Reason
from fxrewrite.passes import Built, ConvRewritePass
from fxrewrite.passes.candidates import Candidate, make_candidate

NAME = "spatial-separable"
INITS = ("svd", "random")


def exact_rank(spec: ConvSpec) -> int:
    """The rank at which the split is exact: min(I*kh, O*kw)."""
    kh, kw = spec.kernel_size
    return min(spec.in_channels * kh, spec.out_channels * kw)


def matrix(weight: Tensor) -> Tensor:
    """W (O, I, kh, kw) as the (I*kh) x (O*kw) matrix M[(i, a), (o, b)] = W[o, i, a, b]."""
    o, i, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(i * kh, o * kw)


def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(vertical (r, I, kh, 1), horizontal (O, r, 1, kw), all singular values) of the rank-r split of ``weight``."""
    o, i, kh, kw = weight.shape
    u, s, vh = torch.linalg.svd(matrix(weight.detach().to(torch.float64)), full_matrices=False)
    root = s[:rank].sqrt()
    vertical = (u[:, :rank] * root).T.reshape(rank, i, kh, 1)
    horizontal = (vh[:rank].T * root).reshape(o, kw, rank).permute(0, 2, 1).reshape(o, rank, 1, kw)
    return vertical.to(weight.dtype), horizontal.to(weight.dtype), s


def tail_error(singular: Tensor, rank: int) -> float:
    """||W - W_r||_F / ||W||_F of the rank-r truncation."""
    total = float(singular.square().sum())
    return math.sqrt(float(singular[rank:].square().sum()) / total) if total > 0 else 0.0


def _conv(like: nn.Conv2d, in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
          padding: tuple[int, int] | str, dilation: tuple[int, int], bias: bool, weight: Tensor | None) -> nn.Conv2d:
    w = like.weight
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, bias=bias,
                     padding_mode=like.padding_mode, device=w.device, dtype=w.dtype)
    if weight is not None:
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias:
                conv.bias.copy_(like.bias) if like.bias is not None else conv.bias.zero_()
    conv.weight.requires_grad_(w.requires_grad)
    return conv.train(like.training)


@dataclass(frozen=True)
class SpatialSeparableForm:
    """Budget candidates ``spatial-separable{rank=r}`` for r = 1 .. the exact rank (or ``max_rank``) that cost
    fewer MACs than the conv; the predicted error is the weight's SVD tail (data-free)."""

    max_rank: int | None = None
    name: str = NAME
    pass_name: str = NAME
    calibrated: ClassVar[bool] = False

    def candidates(self, site: ConvSite, weight: Tensor, stats: Any = None) -> list[Candidate]:
        if SpatialSeparable.eligibility(site) is not None or site.input_shape is None or site.output_shape is None:
            return []
        s = site.spec
        (kh, kw), i, o = s.kernel_size, s.in_channels, s.out_channels
        batch = math.prod(site.output_shape[:-3])
        h_out, w_out, w_in = site.output_shape[-2], site.output_shape[-1], site.input_shape[-1]
        singular = torch.linalg.svdvals(matrix(weight.detach().to(torch.float64)))
        full = exact_rank(s)
        top = full if self.max_rank is None else min(full, self.max_rank)
        out = []
        for r in range(1, top + 1):
            macs = batch * h_out * (r * w_in * i * kh + o * w_out * r * kw)
            params = r * i * kh + o * r * kw + (o if s.bias else 0)
            if macs < site.macs:
                out.append(make_candidate(NAME, {"rank": r}, macs, params, tail_error(singular, r)))
        return out


@dataclass(frozen=True)
class SpatialSeparable(ConvRewritePass):
    """Conv2d kh x kw -> (kh x 1) then (1 x kw), from a truncated SVD of the weight; rank='exact' reproduces it."""

    name = NAME
    description = "Conv2d kh x kw -> (kh x 1) conv then (1 x kw) conv, from a truncated SVD of the weight"
    eligibility_column = "spatial-sep"
    structure_options = MappingProxyType({"init": "random"})
    budget_forms = MappingProxyType({NAME: SpatialSeparableForm})
    rank: int | str = 1
    init: str = "svd"

    def __post_init__(self) -> None:
        if not (self.rank == "exact" or (isinstance(self.rank, int) and not isinstance(self.rank, bool)
                                         and self.rank >= 1)):
            raise ConfigError(f"{self.name}: rank must be a positive integer or 'exact', got {self.rank!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.name}: init must be one of {INITS}, got {self.init!r}")

    def check(self, site: ConvSite) -> Reason | None:
        s = site.spec
        if s.groups != 1:
            return Reason("grouped-conv", f"{site.name}: groups={s.groups}; a spatial split of a grouped conv is "
                          "not implemented.")
        if 1 in s.kernel_size:
            return Reason("already-separable", f"{site.name}: a {s.kernel_size[0]}x{s.kernel_size[1]} kernel has no "
                          "two spatial sides to split.")
        if self.rank != "exact" and int(self.rank) > exact_rank(s):
            return Reason("rank-too-large", f"{site.name}: rank={self.rank} exceeds the exact rank "
                          f"{exact_rank(s)} (min(I*kh, O*kw)); use rank=exact or a smaller rank.")
        return None

    def build(self, site: ConvSite | None, conv: nn.Conv2d) -> Built:
        o, i, kh, kw = conv.weight.shape
        full = min(i * kh, o * kw)
        r = full if self.rank == "exact" else int(self.rank)
        vertical = horizontal = None
        rel_error: float | None = None
        if self.init == "svd":
            vertical, horizontal, singular = svd_factors(conv.weight, r)
            rel_error = tail_error(singular, r)
        p = conv.padding
        pads = (p, p) if isinstance(p, str) else ((p[0], 0), (0, p[1]))
        first = _conv(conv, i, r, (kh, 1), (conv.stride[0], 1), pads[0], (conv.dilation[0], 1), False, vertical)
        second = _conv(conv, r, o, (1, kw), (1, conv.stride[1]), pads[1], (1, conv.dilation[1]),
                       conv.bias is not None, horizontal)
        module = nn.Sequential(first, second).train(conv.training)
        return Built(module, rel_error, self.init == "svd" and r >= full, {"rank": r, "exact_rank": full})
