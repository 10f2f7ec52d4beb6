"""The result of ``verify``: ``Verification``, with every site and output check, the verdict, and its tables.

>>> v = Verification(True, (), (), (), False, "numerics=False was passed", 1e-4, 1e-5, "float level", "float32", 0)
>>> v.summary()
'verification: PASSED; shapes only; numerics skipped: numerics=False was passed'
>>> v.exit_code, v.raise_if_failed() is v
(0, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tabulate import tabulate

from fxrewrite.errors import VerificationFailure
from fxrewrite.util.formatting import json_float
from fxrewrite.verification.formatting import fmt_meta, fmt_rel, fmt_shape, fmt_sqnr, fmt_stats, fmt_status
from fxrewrite.verification.records import CostTotals, OutputCheck, SiteCheck

__all__ = ["Verification"]


@dataclass(frozen=True)
class Verification:
    """The result of ``verify``: ``ok``, the failure messages (each names its site or output) and every figure.

    ``level`` says which tolerance was checked (float level, approximate, or no error gate); ``numerics_reason``
    says why numerics were skipped when ``numerics_checked`` is False. ``timings`` (seconds) are informational.
    """

    ok: bool
    failures: tuple[str, ...]
    sites: tuple[SiteCheck, ...]
    outputs: tuple[OutputCheck, ...]
    numerics_checked: bool
    numerics_reason: str
    rtol: float
    atol: float
    level: str
    dtype: str
    batches: int
    cost_before: CostTotals | None = None
    cost_after: CostTotals | None = None
    mode: str = "eval"
    timings: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def exit_code(self) -> int:
        """The CLI exit code: 0 when every gate passed, 1 otherwise."""
        return 0 if self.ok else 1

    def site(self, name: str) -> SiteCheck:
        """The check of site ``name`` (KeyError naming the known sites when absent)."""
        for s in self.sites:
            if s.site == name:
                return s
        raise KeyError(f"no rewritten site {name!r}; sites: {[s.site for s in self.sites]}")

    def raise_if_failed(self) -> Verification:
        """Raise ``VerificationFailure`` listing every failure; returns self when every gate passed."""
        if not self.ok:
            raise VerificationFailure("verification failed (" + self.level + "):\n  " + "\n  ".join(self.failures))
        return self

    def summary(self) -> str:
        """One line: PASSED/FAILED, the level and how numerics ran (or why they were skipped)."""
        verdict = "PASSED" if self.ok else f"FAILED ({len(self.failures)} failure(s))"
        if self.numerics_checked:
            how = (f"numerics on {self.batches} batch{'es' if self.batches != 1 else ''} in {self.mode} mode; "
                   f"tolerance: {self.level}")
        else:
            how = f"shapes only; numerics skipped: {self.numerics_reason}"
        return f"verification: {verdict}; {how}"

    def site_rows(self) -> list[list[str]]:
        rows = []
        for s in self.sites:
            before = fmt_shape(s.output_before)
            after = fmt_shape(s.output_after)
            shape = before if before == after else f"{before} -> {after}"
            rows.append([s.site, shape, *fmt_stats(s.local), fmt_rel(s.accumulated), fmt_sqnr(s.accumulated),
                         fmt_status(s.status, s.reason)])
        return rows

    SITE_HEADERS = ("site", "output shape", "local rel. L2", "local max abs", "local SQNR dB", "local cosine",
                    "accum. rel. L2", "accum. SQNR dB", "status")
    OUTPUT_HEADERS = ("output", "shape / dtype / memory format", "rel. L2", "max abs", "SQNR dB", "cosine", "status")

    def output_rows(self) -> list[list[str]]:
        rows = []
        for o in self.outputs:
            before = fmt_meta(o.before)
            after = fmt_meta(o.after)
            rows.append([o.name, before if before == after else f"{before} -> {after}", *fmt_stats(o.error),
                         fmt_status(o.status, o.reason)])
        return rows

    def table(self, tablefmt: str = "simple", *, summary: bool = True) -> str:
        """The summary line (unless ``summary=False``), the per-site and per-output tables and the failures."""
        blocks = [self.summary()] if summary else []
        if self.sites:
            blocks.append(tabulate(self.site_rows(), headers=self.SITE_HEADERS, tablefmt=tablefmt,
                                   disable_numparse=True))
        blocks.append(tabulate(self.output_rows(), headers=self.OUTPUT_HEADERS, tablefmt=tablefmt,
                               disable_numparse=True))
        notes = ["local: the new subgraph vs the original conv on the same input; accum.: the rewritten model vs the "
                 "original at that point. rel. L2 = ||a-b||/||b||, SQNR = 10 log10(||b||^2/||a-b||^2), b = original."]
        if self.failures:
            notes += ["failures:"] + [f"  {f}" for f in self.failures]
        return "\n\n".join(blocks) + "\n" + "\n".join(notes)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "failures": list(self.failures), "level": self.level,
            "rtol": json_float(self.rtol), "atol": json_float(self.atol), "dtype": self.dtype,
            "numerics_checked": self.numerics_checked, "numerics_reason": self.numerics_reason,
            "batches": self.batches, "mode": self.mode,
            "cost_before": self.cost_before.to_dict() if self.cost_before else None,
            "cost_after": self.cost_after.to_dict() if self.cost_after else None,
            "sites": [s.to_dict() for s in self.sites], "outputs": [o.to_dict() for o in self.outputs],
            "timings_s": {k: round(v, 6) for k, v in self.timings.items()},
        }
