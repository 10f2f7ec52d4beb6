"""Grouped rewrite: Conv2d -> Conv2d(groups=g) keeping the block-diagonal blocks of the trained weight.

Output block b keeps the weights that see input block b; the rest is dropped. The kept weight energy
||W_kept||^2 / ||W||^2 is recorded per site (``details["kept_energy"]``) and the relative error is
sqrt(1 - kept). A weight that is already block-diagonal converts exactly. ``init=random`` uses torch's default
initialisation instead.

>>> import torch
>>> from fxrewrite.capture import trace
>>> gm = trace(torch.nn.Conv2d(8, 16, 3))
>>> Grouped(groups=4)(gm).graph_module.conv.groups
4
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fxrewrite import factorize
from fxrewrite.sites import ConvSite, Reason, check_groups

from .base import Built, ConvRewritePass, make_conv

INITS = ("block", "random")


@dataclass(frozen=True)
class Grouped(ConvRewritePass):
    """Conv2d -> Conv2d(groups=g) keeping the block diagonal of the trained weight."""

    name = "grouped"
    description = "Conv2d -> Conv2d(groups=g), keeping the block-diagonal part of the trained weight"
    kind = "grouped"
    groups: int = 4
    init: str = "block"

    def __post_init__(self) -> None:
        self._require(isinstance(self.groups, int) and not isinstance(self.groups, bool) and self.groups >= 2,
                      f"{self.name}: groups must be an integer >= 2, got {self.groups!r}")
        self._require(self.init in INITS, f"{self.name}: init must be one of {INITS}, got {self.init!r}")

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
