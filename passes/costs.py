"""Analytic costs of a convolution's replacement, from the site's shapes alone (no module is built): what a pass
declares it will cost, and what budgets use to price their candidates.

>>> positions((2, 16, 8, 8), 16)  # batch x height x width
128
>>> positions(None, 16)
0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["positions"]


def positions(shape: Sequence[int] | None, channels: int) -> int:
    """Positions per channel (batch x spatial) of an NCHW shape with ``channels`` channels (0 without a shape)."""
    if shape is None:
        return 0
    return math.prod(int(d) for d in shape) // max(channels, 1)
