"""What a repair reports: one ``SiteRepair`` per rewritten site and the ``RepairResult`` (the repaired module,
the errors before and after, the held-out checks, what BatchNorm layers changed), with its table and JSON.

>>> site = SiteRepair("conv1", "conv1.2", "repaired", error_before=0.12, error_after=0.03, columns=512)
>>> result = RepairResult(None, (site,), 0.2, 0.05, batches=4, samples=32, ridge=1e-4)
>>> result.site("conv1").status, result.rows()[0]
('repaired', ['conv1', 'conv1.2', 'repaired', '0.12', '0.03', '- -> -', '512'])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tabulate import tabulate

from fxrewrite.util.formatting import json_float

__all__ = ["RepairResult", "SiteRepair"]


@dataclass(frozen=True)
class SiteRepair:
    """One rewritten site: which conv was refit and the site output's relative L2 error against the original.

    ``error_before``/``error_after`` are end to end (the data-free rewrite / the final repaired model, each run on its
    own from the model inputs); ``fit_before``/``fit_after`` are the least-squares residual of that one conv with the
    old / new weights on the inputs it saw during the refit (upstream already repaired, before BatchNorm
    re-estimation). ``columns`` is the number of output pixels the fit used (batch x height x width, all processes).
    ``check_before``/``check_after`` are the held-out check: that conv's residual on the check half of the data
    with the data-free weights / the weights fit on the fit half alone (module docstring).

    ``status``: "repaired" (refit), "kept" (the refit failed the held-out check, or there was no check half: the
    data-free weights are kept, ``reason`` says why) or "skipped" (the site has no conv to refit).
    """

    site: str
    conv: str | None
    status: str  # "repaired", "kept" or "skipped"
    reason: str = ""
    error_before: float = math.nan
    error_after: float = math.nan
    fit_before: float = math.nan
    fit_after: float = math.nan
    columns: int = 0
    check_before: float = math.nan
    check_after: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {k: json_float(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class RepairResult:
    """The repaired module (a new GraphModule; the inputs are untouched) and what the repair did."""

    module: torch.fx.GraphModule
    sites: tuple[SiteRepair, ...]
    output_error_before: float
    output_error_after: float
    batches: int
    samples: int
    ridge: float
    bn: str | None = "match"
    bn_layers: tuple[str, ...] = ()
    bn_matched: tuple[tuple[str, int, int], ...] = ()  # bn="match": (layer, channels changed, channels)
    world_size: int = 1
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def site(self, name: str) -> SiteRepair:
        for s in self.sites:
            if s.site == name:
                return s
        raise KeyError(f"no site {name!r}; sites: {[s.site for s in self.sites]}")

    def rows(self) -> list[list[str]]:
        rows = [[s.site, s.conv or "-", s.status if not s.reason else f"{s.status}: {s.reason}",
                 _fmt(s.error_before), _fmt(s.error_after), f"{_fmt(s.check_before)} -> {_fmt(s.check_after)}",
                 f"{s.columns:,}"] for s in self.sites]
        rows.append(["(model output)", "", "", _fmt(self.output_error_before), _fmt(self.output_error_after), "",
                     ""])
        return rows

    def table(self, tablefmt: str = "simple") -> str:
        head = ["site", "refit conv", "status", "rel. L2 before", "rel. L2 after", "held-out check", "columns"]
        return tabulate(self.rows(), headers=head, tablefmt=tablefmt, disable_numparse=True)

    def __str__(self) -> str:
        bn = f"BatchNorm {self.bn}: {len(self.bn_layers)} layer(s)" if self.bn_layers else "no BatchNorm changed"
        if self.bn_matched:
            bn += (f", {sum(k for _, k, _ in self.bn_matched):,} of {sum(c for _, _, c in self.bn_matched):,} "
                   "channels passed the held-out check")
        lines = [f"repair: {self.batches} calibration batch(es), {self.samples} sample(s), world size "
                 f"{self.world_size}, ridge {self.ridge:g} x mean Gram diagonal (towards the data-free weights), "
                 f"{bn}, {self.seconds:.2f} s",
                 "rel. L2 = ||rewritten - original|| / ||original|| of each site's output on the calibration data; "
                 "held-out check = the refit conv's residual on the odd samples of each batch, data-free weights "
                 "-> weights fit on the even samples",
                 self.table(), *self.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        return self.table("github")

    def to_dict(self) -> dict[str, Any]:
        return {"sites": [s.to_dict() for s in self.sites],
                "output_error_before": json_float(self.output_error_before),
                "output_error_after": json_float(self.output_error_after), "batches": self.batches,
                "samples": self.samples, "ridge": self.ridge, "bn": self.bn, "bn_layers": list(self.bn_layers),
                "bn_matched": [list(m) for m in self.bn_matched],
                "world_size": self.world_size, "seconds": self.seconds, "notes": list(self.notes)}


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"
