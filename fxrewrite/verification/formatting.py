"""Text of a verification: the figures as table cells (``fmt_rel`` and friends) and the pieces of its failure
messages (``site_label``, ``first_line``).

>>> from fxrewrite.verification.records import ErrorStats
>>> e = ErrorStats(rel_l2=1.234e-5, max_abs=2e-6, sqnr_db=98.17, cosine=0.9999999, numel=4)
>>> fmt_rel(e), fmt_stats(e), fmt_rel(None)
('1.23e-05', ['1.23e-05', '2e-06', '98.2', '1.000000'], '-')
>>> site_label("conv1"), site_label(None), first_line(ValueError("bad shape\\nmore detail"))
('site conv1', 'model', 'bad shape')
"""

from __future__ import annotations

import math

from fxrewrite.verification.records import ErrorStats, TensorMeta

__all__ = ["first_line", "fmt_g", "fmt_meta", "fmt_rel", "fmt_shape", "fmt_sqnr", "fmt_stats", "fmt_status",
           "site_label"]


def fmt_g(x: float) -> str:
    """A figure with 3 significant digits (``0``, ``inf``, ``nan`` spelled out)."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return "0" if x == 0 else f"{x:.3g}"


def fmt_rel(e: ErrorStats | None) -> str:
    if e is None:
        return "-"
    return f"non-finite ({e.nonfinite})" if e.nonfinite else fmt_g(e.rel_l2)


def fmt_sqnr(e: ErrorStats | None) -> str:
    if e is None:
        return "-"
    return fmt_g(e.sqnr_db) if math.isinf(e.sqnr_db) or math.isnan(e.sqnr_db) else f"{e.sqnr_db:.1f}"


def fmt_stats(e: ErrorStats | None) -> list[str]:
    if e is None:
        return ["-", "-", "-", "-"]
    return [fmt_rel(e), fmt_g(e.max_abs), fmt_sqnr(e), f"{e.cosine:.6f}"]


def fmt_shape(m: TensorMeta | None) -> str:
    return "?" if m is None else "x".join(str(d) for d in m.shape) or "scalar"


def fmt_meta(m: TensorMeta | None) -> str:
    return "?" if m is None else f"{fmt_shape(m)} {m.dtype} {m.memory_format}"


def fmt_status(status: str, reason: str) -> str:
    """A table cell: ``ok``, ``failed`` (the failures list below the table says why) or ``unchecked: why``."""
    return f"{status}: {reason}" if status == "unchecked" and reason else status


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def site_label(site: str | None) -> str:
    """How a failure message names where it happened: ``site <name>``, or ``model`` when no site is to blame."""
    return f"site {site}" if site is not None else "model"
