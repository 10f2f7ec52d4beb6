"""Analytic costs of a convolution's replacement, from the site's shapes alone (no module is built). A conv rewrite
pass declares what its replacement costs once, in ``cost`` (``ConvRewritePass.cost``), out of ``conv_cost`` terms
(one per conv it builds, each at the spatial size it computes): budgets price their candidates with it, the digits
demo its options, and the tests check it against ``replacement_cost`` of the module the pass builds.

Every quantity may be a numpy integer array (e.g. all the ranks of a site at once): the result is then an array of
the same shape.

>>> import numpy as np
>>> pix = positions((2, 16, 8, 8), 16)  # batch x height x width
>>> pix
128
>>> conv_cost(pix, 8, 16, groups=2, kernel=9, bias=True)
Cost(macs=73728, params=592)
>>> rank = np.arange(1, 4)  # a 1x1 conv to rank channels, then a 3x3 conv from them
>>> cost = conv_cost(pix, 8, rank, groups=1, kernel=1) + conv_cost(pix, rank, 16, groups=1, kernel=9)
>>> cost.macs.tolist(), cost.params.tolist()
([19456, 38912, 58368], [152, 304, 456])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fxrewrite.errors import ConfigError

__all__ = ["Cost", "Shape", "conv_cost", "option_values", "positions"]

#: an NCHW shape (None where shapes are unknown: then positions, and so MACs, count 0, as ``ConvSite.macs``)
Shape = Sequence[int] | None


@dataclass(frozen=True)
class Cost:
    """MACs (1 MAC = one multiply-add, bias adds not counted, as ``fxrewrite.measure.cost``) and parameters (bias
    included) of a replacement; ints, or numpy arrays of them. ``+`` adds two costs."""

    macs: Any
    params: Any

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)


def positions(shape: Shape, channels: int) -> int:
    """Positions per channel (batch x spatial) of an NCHW shape with ``channels`` channels (0 without a shape)."""
    if shape is None:
        return 0
    return math.prod(int(d) for d in shape) // max(channels, 1)


def conv_cost(positions: Any, in_channels: Any, out_channels: Any, *, groups: Any, kernel: Any,
              bias: bool = False) -> Cost:
    """A conv computing ``positions`` output positions (batch x spatial) with ``kernel`` taps (kh * kw):
    ``positions * out_channels * in_channels / groups * kernel`` MACs (``fxrewrite.measure.cost.conv_macs``) and
    ``out_channels * in_channels / groups * kernel`` weights, plus ``out_channels`` with a bias."""
    weights = out_channels * (in_channels // groups) * kernel
    return Cost(positions * weights, weights + (out_channels if bias else 0))


def option_values(pass_class: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over the defaults of a pass's options (its dataclass fields); an unknown name is a
    ``ConfigError``. The values are not validated (a cost may take arrays where the pass takes one value)."""
    fields = {f.name: f.default for f in dataclasses.fields(pass_class)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"{getattr(pass_class, 'name', pass_class)}: unknown option(s) {unknown}; valid: "
                          f"{sorted(fields)}")
    return fields | dict(options)
