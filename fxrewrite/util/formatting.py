"""Number formatting shared by reports and tables.

>>> fmt_int(1_234_567), fmt_int(None), json_float(float("inf"))
('1.23M', '?', 'inf')
"""

from __future__ import annotations

import math


def fmt_int(n: int | None) -> str:
    """A count with a K / M / G suffix (``?`` when unknown)."""
    if n is None:
        return "?"
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def json_float(x: float) -> float | str:
    """A float as JSON allows it: finite values as is, ``inf`` / ``-inf`` / ``nan`` as strings."""
    return x if math.isfinite(x) else str(x)
