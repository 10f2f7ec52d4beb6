"""What a pass offers a budget: candidates (one way to implement a site, with its cost and predicted error) and
the ``Form`` protocol of the objects that list them. A pass declares its forms in ``Pass.budget_forms``.

>>> c = make_candidate("grouped", {"groups": 2}, macs=10368, params=288, rel_error=0.5)
>>> c.spec(), c.to_dict()["predicted_rel_error"]
('grouped{groups=2}', 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from fxrewrite.graph.sites import ConvSite

#: the form name of "leave the conv as it is"
KEEP = "keep"


@dataclass(frozen=True)
class Candidate:
    """One way to implement a site: ``form`` is a pass's CLI name (``"keep"`` for the original conv) and
    ``options`` its per-site options; ``macs`` / ``params`` are the site's cost after the change, ``rel_error``
    the predicted relative error: of the weight, ``||W - W'||_F / ||W||_F`` (data-free), or of the site's output on
    the calibration data (``choose_plan(..., calibration=...)``); ``latency_ms`` the measured latency of the
    replacement (latency targets only)."""

    form: str
    options: Mapping[str, Any]
    macs: int
    params: int
    rel_error: float
    latency_ms: float | None = None

    def spec(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.form}{{{opts}}}" if opts else self.form

    def to_dict(self) -> dict[str, Any]:
        out = {"form": self.form, "options": dict(self.options), "macs": self.macs, "params": self.params,
               "predicted_rel_error": self.rel_error}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        return out


def make_candidate(form: str, options: Mapping[str, Any], macs: int, params: int, rel_error: float) -> Candidate:
    return Candidate(form, MappingProxyType(dict(options)), int(macs), int(params), float(rel_error))


@runtime_checkable
class Form(Protocol):
    """A candidate generator: ``name`` identifies it in ``forms=``; ``pass_name`` is the pass that applies it (the
    candidates' options are that pass's options); ``candidates`` lists every option set it allows at a site, with
    cost and predicted error (no module is built). A form that can predict output errors from calibration
    statistics sets ``calibrated = True`` and accepts ``candidates(site, weight, stats)`` (a ``SiteStats``)."""

    name: str
    pass_name: str

    def candidates(self, site: ConvSite, weight: Tensor) -> list[Candidate]: ...
