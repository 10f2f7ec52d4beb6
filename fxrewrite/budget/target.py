"""What a budget aims at: ``Target`` (upper bounds on MACs, parameters and latency as fractions of the original),
the objective's per-site loss (``site_loss``, ``OBJECTIVES``) and ``BudgetInfeasible`` for a target no plan meets.

>>> Target(macs=0.5, params=0.25).to_dict()
{'macs': 0.5, 'params': 0.25}
>>> round(site_loss(0.1, "log-cosine"), 6), site_loss(0.1, "squared")
(0.01005, 0.010000000000000002)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fxrewrite.errors import ConfigError

__all__ = ["OBJECTIVES", "BudgetInfeasible", "Target", "site_loss"]

OBJECTIVES = ("log-cosine", "squared")
_MAX_LOSS2 = 1.0 - 1e-9  # log-cosine of a site that keeps nothing: -log(1e-9), large but finite


def site_loss(rel_error: float, objective: str) -> float:
    """One site's term of the objective for relative weight error ``e``: ``e^2`` (squared) or ``-log(1 - e^2)``
    (log-cosine: ``1 - e^2`` is the squared cosine between the new and the old weight for these projections).

    >>> site_loss(0.6, "squared"), round(site_loss(0.6, "log-cosine"), 6)  # -log(0.64)
    (0.36, 0.446287)
    """
    e2 = min(rel_error * rel_error, _MAX_LOSS2)
    return e2 if objective == "squared" else -math.log1p(-e2)


class BudgetInfeasible(ConfigError):
    """No choice of the allowed forms meets the target; the message says which fraction is reachable and why."""


def _fraction(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ConfigError(f"Target: {name} must be a fraction of the original model's total in (0, 1], "
                          f"got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"Target: {name}={value} must be in (0, 1] (a fraction of the original model's total, "
                          f"e.g. {name}=0.5 for at most half)")
    return float(value)


@dataclass(frozen=True)
class Target:
    """Upper bounds on the rewritten model's totals as fractions of the original's (``macs=0.5``: at most half the
    MACs; ``latency=0.5``: at most half the original **whole model's** latency, measured on ``backend`` at the
    example inputs: per-layer timings (``fxrewrite.budget.layer_latency``) guide the search, then the plan is measured
    as a whole and tightened until it holds, see ``fxrewrite.budget.whole_model``). At least one bound must be given;
    any may be combined.

    ``check_latency`` (default True): with any target, ``rewrite`` times the whole original and rewritten model on
    the example inputs (``backend``; eager for a MAC / params target; a bounded number of interleaved runs) and says
    in the report (section ``whole-model latency``, JSON ``context["model_latency"]``) and with a ``UserWarning``
    when the rewritten model is slower. ``check_latency=False`` skips that measurement (a latency target still
    measures: it cannot be met otherwise).

    >>> Target(macs=0.5).describe()
    'macs <= 0.5x'
    >>> Target(latency=0.6, params=0.5).describe()
    'params <= 0.5x, latency <= 0.6x (eager)'
    >>> Target(macs=1.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxrewrite.errors.ConfigError: Target: macs=1.5 must be in (0, 1] ...
    """

    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    backend: str = "eager"
    check_latency: bool = True

    def __post_init__(self) -> None:
        from fxrewrite.budget.layer_latency import BACKENDS
        macs, params = _fraction("macs", self.macs), _fraction("params", self.params)
        latency = _fraction("latency", self.latency)
        if macs is None and params is None and latency is None:
            raise ConfigError("Target needs macs=, params= and/or latency= (fractions of the original model's "
                              "totals), e.g. Target(macs=0.5)")
        if self.backend not in BACKENDS:
            raise ConfigError(f"Target: unknown latency backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if not isinstance(self.check_latency, bool):
            raise ConfigError(f"Target: check_latency must be True or False, got {self.check_latency!r}")
        if latency is None and self.backend != "eager":
            raise ConfigError(f"Target: backend={self.backend!r} only applies to a latency target; add latency=, "
                              "e.g. Target(latency=0.5, backend=...)")
        object.__setattr__(self, "macs", macs)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "latency", latency)

    def describe(self) -> str:
        parts = [f"{k} <= {v:g}x" for k, v in (("macs", self.macs), ("params", self.params)) if v is not None]
        if self.latency is not None:
            parts.append(f"latency <= {self.latency:g}x ({self.backend})")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"macs": self.macs, "params": self.params}
        if self.latency is not None:
            out |= {"latency": self.latency, "backend": self.backend}
        if not self.check_latency:
            out["check_latency"] = False
        return out
