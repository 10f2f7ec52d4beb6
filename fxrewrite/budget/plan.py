"""The result of a budget: ``BudgetPlan`` (per site a ``SiteChoice``: the chosen candidate, its cost before and
after and its predicted error; model totals before and after), which applies itself to a graph, replays as a
``fxrewrite.RewritePlan``, prints as a table and saves as JSON.

>>> from fxrewrite.passes.candidates import make_candidate
>>> choice = SiteChoice("conv", make_candidate("grouped", {"groups": 2}, 5184, 144, 0.5), 10368, 288)
>>> plan = BudgetPlan(Target(macs=0.5), (choice,), 10368, 288, 5184, 144, 0.2877, "auto", ("grouped",))
>>> plan.macs_fraction, [c.candidate.spec() for c in plan.changed]
(0.5, ['grouped{groups=2}'])
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from tabulate import tabulate

from fxrewrite.budget.target import Target
from fxrewrite.errors import ConfigError
from fxrewrite.graph.select import Rule
from fxrewrite.passes import pass_class
from fxrewrite.passes.candidates import KEEP, Candidate

__all__ = ["BudgetPlan", "SiteChoice"]


@dataclass(frozen=True)
class SiteChoice:
    """The chosen candidate at one site, its cost before, its importance weight and how many candidates it had;
    with a latency target also the original conv's latency and how many measured candidates were pruned for not
    being faster than it."""

    site: str
    candidate: Candidate
    macs_before: int
    params_before: int
    weight: float = 1.0
    candidates: int = 1
    latency_before_ms: float | None = None
    pruned_slower: int = 0

    @property
    def changed(self) -> bool:
        return self.candidate.form != KEEP

    @property
    def predicted_rel_error(self) -> float:
        return self.candidate.rel_error

    def to_dict(self) -> dict[str, Any]:
        out = {"site": self.site, **self.candidate.to_dict(), "macs_before": self.macs_before,
               "params_before": self.params_before, "weight": self.weight, "candidates": self.candidates}
        if self.latency_before_ms is not None:
            out |= {"latency_before_ms": self.latency_before_ms, "pruned_slower": self.pruned_slower}
        return out


@dataclass(frozen=True)
class BudgetPlan:
    """Per-site choices meeting ``target``; model totals before and (predicted by the cost model) after.

    ``objective`` is the value of the objective named ``objective_name`` (see ``fxrewrite.budget.choose``); the
    errors are ``error_metric``: ``"weight"`` (data-free) or ``"output"`` (calibration). ``apply(gm)`` runs the
    passes with one exact-name rule per changed site (``rules()`` / ``pipeline()`` give them), so the result replays
    with ``fxrewrite.apply_plan``. With a latency target, ``latency_before_ms`` / ``latency_after_ms`` are the summed
    measured latencies of the conv sites before and (predicted from the per-layer figures) after, and
    ``latency_info`` says how they were measured; ``latency_check(report)`` compares the prediction with a
    whole-model measurement. ``model_latency`` (latency targets, from ``fxrewrite.budget.whole_model.fit_latency``):
    the bound on the whole model, what was timed, every round of measuring and tightening, the seconds it took and
    the accepted plan's ``timing``. ``end_to_end`` (calibrated MAC / params budgets, from
    ``fxrewrite.budget.end_to_end.fit_end_to_end``): the predicted and measured whole-model output error of this plan,
    which plan was chosen (``"budget round k"`` or ``"uniform <family>"``), every round's figures, the uniform plans'
    figures, the measured per-site gains and the seconds it took.
    """

    target: Target
    choices: tuple[SiteChoice, ...]
    macs_before: int
    params_before: int
    macs_after: int
    params_after: int
    objective: float
    method: str
    forms: tuple[str, ...]
    seconds: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    excluded: tuple[tuple[str, str], ...] = ()  # (site, why it has no candidates)
    objective_name: str = "log-cosine"
    error_metric: str = "weight"
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None
    latency_info: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    model_latency: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    end_to_end: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: (signature, PassResult): this plan applied to a copy of the graph it was planned on, when planning built it
    #: already (the end-to-end fit measures its plans on whole models); ``applied`` hands it out instead of
    #: factorising every site again. Not part of the plan's value (not compared, not printed, not serialised).
    prebuilt: tuple[tuple[str, ...], Any] | None = field(default=None, compare=False, repr=False)

    def applied(self, gm: torch.fx.GraphModule) -> Any:
        """The ``PassResult`` of this plan on ``gm``, the graph it was planned on: the one planning already built
        (``prebuilt``, for these very choices; ``gm`` is then left as it is), or ``apply(gm)``."""
        if self.prebuilt is not None and self.prebuilt[0] == self.signature:
            return self.prebuilt[1]
        return self.apply(gm)

    @property
    def predicted_output_error(self) -> float | None:
        """The whole-model relative output error the objective predicts for this plan (calibrated budgets; see
        ``fxrewrite.budget.end_to_end``), None without an end-to-end record."""
        return self.end_to_end.get("predicted")

    @property
    def measured_output_error(self) -> float | None:
        """The whole model's measured relative output error ``||f'(x) - f(x)|| / ||f(x)||`` on the calibration
        batches (calibrated budgets), None without an end-to-end record."""
        return self.end_to_end.get("measured")

    @property
    def signature(self) -> tuple[str, ...]:
        """Every site's chosen candidate as an option string: two plans with the same signature build the same
        model (the budget fits use it to measure each distinct plan once)."""
        return tuple(c.candidate.spec() for c in self.choices)

    @property
    def macs_fraction(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def params_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def latency_fraction(self) -> float | None:
        if self.latency_before_ms is None or self.latency_after_ms is None or self.latency_before_ms <= 0:
            return None
        return self.latency_after_ms / self.latency_before_ms

    @property
    def changed(self) -> tuple[SiteChoice, ...]:
        return tuple(c for c in self.choices if c.changed)

    def latency_check(self, report: Any) -> dict[str, Any] | None:
        """Predicted vs measured whole-model latency, from a ``fxrewrite.measure.latency.LatencyReport`` of the
        original and the rewritten model on the plan's backend (``cuda``: the report's eager figures on a GPU). The
        prediction is the measured original minus the per-site savings of the plan. None without a latency target or
        without an ``ok`` figure for the backend."""
        if self.latency_before_ms is None or self.latency_after_ms is None or report is None:
            return None
        backend = self.target.backend
        if backend == "cuda":
            if not str(getattr(report, "device", "")).startswith("cuda"):
                return None
            backend = "eager"
        timing = next((b for b in report.backends if b.backend == backend and b.status == "ok"), None)
        if timing is None or timing.original_ms is None or timing.rewritten_ms is None:
            return None
        predicted = timing.original_ms - (self.latency_before_ms - self.latency_after_ms)
        return {"backend": self.target.backend, "threads": report.threads,
                "plan_threads": self.latency_info.get("threads"), "measured_original_ms": timing.original_ms,
                "measured_rewritten_ms": timing.rewritten_ms, "predicted_rewritten_ms": predicted,
                "predicted_over_measured": predicted / timing.rewritten_ms if timing.rewritten_ms > 0 else None,
                "measured_fraction": timing.ratio,
                "predicted_fraction": predicted / timing.original_ms if timing.original_ms > 0 else None}

    def rules(self) -> dict[str, list[Rule]]:
        """Per pass name (in the order the plan applies them), one exact-name rule per site with its options."""
        out: dict[str, list[Rule]] = {}
        for c in self.changed:
            out.setdefault(c.candidate.form, []).append(Rule(c.site, options=c.candidate.options))
        return out

    def pipeline(self, *, structure_only: bool = False) -> list[tuple[Any, list[Rule]]]:
        """``[(pass, rules), ...]``: run each pass with its own rules (``pass.run(gm, rules)``), in order.
        ``structure_only`` builds the new modules with each pass's ``structure_options`` (``init=random`` for the
        built-in ones: no factorisation, fast, for costs)."""
        out = []
        for name, rules in self.rules().items():
            cls = pass_class(name)
            if structure_only:
                rules = [dataclasses.replace(r, options=MappingProxyType({**r.options, **cls.structure_options}))
                         for r in rules]
            out.append((cls(), rules))
        return out

    def apply(self, gm: torch.fx.GraphModule, *, structure_only: bool = False) -> Any:
        """Rewrite ``gm`` in place with the plan; returns a ``PassResult`` with a record for every site of ``gm``,
        in graph order: the rewritten ones (their ``details`` carry ``budget_predicted_rel_error``) and, skipped, the
        ones the plan keeps (``budget-kept``) or could not consider (the reason ``excluded`` gives). Raises
        ``ConfigError`` if a pass declines a site the plan chose (the plan was made for another graph).
        ``structure_only``: see ``pipeline``."""
        from fxrewrite.graph.rewriter import portable
        from fxrewrite.graph.sites import find_sites
        from fxrewrite.passes import PassManager, PassResult
        sites = find_sites(gm)
        predicted = {c.site: c for c in self.changed}
        records = []
        modified = False
        for p, rules in self.pipeline(structure_only=structure_only):
            result = PassManager([p], rules)(gm)
            gm = result.graph_module
            modified |= result.modified
            names = {r.match for r in rules}
            for r in result.records:
                if r.site not in names:
                    continue
                if r.status != "rewritten":
                    raise ConfigError(f"budget plan: pass {p.name!r} did not rewrite {r.site!r} ({r.code}: "
                                      f"{r.reason}); the plan was chosen on a different graph, choose it again.")
                extra = {"budget_predicted_rel_error": predicted[r.site].predicted_rel_error,
                         "budget_weight": predicted[r.site].weight}
                records.append(dataclasses.replace(r, details=MappingProxyType({**r.details, **extra})))
        from fxrewrite.budget.site_records import every_site
        return PassResult(portable(gm), modified, every_site(self, sites, records))

    def to_rewrite_plan(self, input_shapes: Sequence[Sequence[int]] | None = None) -> Any:
        """The replayable ``fxrewrite.RewritePlan`` of this plan (``apply_plan(fresh_model, plan)`` rebuilds the
        architecture; load the rewritten weights afterwards)."""
        from fxrewrite.io.replay import PlanEntry, RewritePlan
        entries = tuple(PlanEntry(c.site, c.candidate.form, MappingProxyType(dict(c.candidate.options)))
                        for form in self.rules() for c in self.changed if c.candidate.form == form)
        shapes = tuple(tuple(int(d) for d in s) for s in input_shapes) if input_shapes is not None else None
        return RewritePlan(entries, shapes)

    def to_dict(self, result: Any = None, latency: Any = None) -> dict[str, Any]:
        """The plan as plain data. With the ``RewriteResult`` / ``PassResult`` of applying it, every site also gets
        ``measured_rel_error`` (the weight error the pass reports) and, when verified, ``measured_output_rel_l2``
        (the site's local output error). With a latency target, ``latency`` has the per-layer totals and, given a
        ``LatencyReport`` (``latency=`` or ``result.latency``), the predicted vs measured model latency."""
        weight_err, out_err = _measured(result)
        sites = []
        for c in self.choices:
            d = c.to_dict()
            if c.site in weight_err:
                d["measured_rel_error"] = weight_err[c.site]
            if c.site in out_err:
                d["measured_output_rel_l2"] = out_err[c.site]
            sites.append(d)
        e2e = {"end_to_end": _plain(self.end_to_end)} if self.end_to_end else {}
        return {"target": self.target.to_dict(), "method": self.method, "forms": list(self.forms),
                "objective": self.objective, "objective_name": self.objective_name,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "macs_fraction": self.macs_fraction, "params_fraction": self.params_fraction,
                "error_metric": self.error_metric, "seconds": dict(self.seconds), "sites": sites,
                "excluded": [{"site": s, "reason": r} for s, r in self.excluded]
                } | self._latency_dict(result, latency) | e2e

    def _latency_dict(self, result: Any, latency: Any) -> dict[str, Any]:
        if self.latency_before_ms is None:
            return {}
        check = self.latency_check(latency if latency is not None else getattr(result, "latency", None))
        return {"latency": {"sites_before_ms": self.latency_before_ms, "sites_after_ms": self.latency_after_ms,
                            "sites_fraction": self.latency_fraction, **self.latency_info,
                            "pruned_slower": sum(c.pruned_slower for c in self.choices),
                            "model": check, "whole_model": self._model_latency_dict()}}

    def _model_latency_dict(self) -> dict[str, Any] | None:
        if not self.model_latency:
            return None
        timing = self.model_latency.get("timing")
        return dict(self.model_latency) | {"timing": timing.to_dict() if timing is not None else None}

    def to_json(self, indent: int | None = 2, result: Any = None, latency: Any = None) -> str:
        return json.dumps(self.to_dict(result, latency), indent=indent)

    def save(self, path: str | Path, result: Any = None, input_shapes: Sequence[Sequence[int]] | None = None
             ) -> Path:
        """Write the plan atomically as a ``fxrewrite.RewritePlan`` JSON (``RewritePlan.load`` + ``apply_plan``
        replay it) with the budget plan under ``"budget"``: per site the choice, cost, predicted error and, given
        ``result``, the measured errors. ``input_shapes`` default to those recorded in ``result``'s report."""
        from fxrewrite.io.artifacts import atomic_write_text
        if input_shapes is None:
            shapes = getattr(getattr(result, "report", None), "context", {}).get("input_shapes")
            input_shapes = shapes if isinstance(shapes, list | tuple) else None
        doc = self.to_rewrite_plan(input_shapes).to_dict() | {"budget": self.to_dict(result)}
        return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")

    def table(self, result: Any = None, tablefmt: str = "simple", latency: Any = None) -> str:
        """Per-site choice, cost and predicted error (and, with a latency target, latency before / after and the
        candidates pruned as not faster); with a ``RewriteResult`` (or ``PassResult``) also the measured weight
        error and, when verified, the measured local output error (rel. L2)."""
        measured_w, measured_out = _measured(result)
        timed = self.latency_before_ms is not None
        rows = []
        for c in self.choices:
            row = [c.site, c.candidate.spec(), f"{c.macs_before:,}", f"{c.candidate.macs:,}",
                   f"{c.params_before:,}", f"{c.candidate.params:,}", f"{c.predicted_rel_error:.4f}"]
            if timed:
                row += [f"{c.latency_before_ms:.3f}", f"{c.candidate.latency_ms:.3f}", c.pruned_slower]
            if result is not None:
                w = measured_w.get(c.site)
                row += ["" if w is None else f"{w:.4f}",
                        f"{measured_out[c.site]:.4f}" if c.site in measured_out else ""]
            rows.append(row)
        err = "pred. w-err" if self.error_metric == "weight" else "pred. out-err"
        headers = ["site", "choice", "MACs before", "MACs after", "params before", "params after", err]
        if timed:
            headers += ["ms before", "ms after", "pruned"]
        if result is not None:
            headers += ["meas. w-err", "meas. out-err"]
        head = (f"budget plan ({self.target.describe()}; {self.method}): MACs {self.macs_before:,} -> "
                f"{self.macs_after:,} ({self.macs_fraction:.3f}x), params {self.params_before:,} -> "
                f"{self.params_after:,} ({self.params_fraction:.3f}x); {self.objective_name} objective "
                f"{self.objective:.4g} ({self.error_metric} errors); "
                f"{len(self.changed)} of {len(self.choices)} candidate sites changed")
        if timed:
            info = self.latency_info
            head += (f"\nconv-site latency ({info.get('backend')}, {info.get('threads')} thread(s), median of "
                     f"{info.get('runs')} after {info.get('warmup')} warm-up): {self.latency_before_ms:.3f} ms -> "
                     f"{self.latency_after_ms:.3f} ms ({self.latency_fraction:.3f}x) predicted")
            check = self.latency_check(latency if latency is not None else getattr(result, "latency", None))
            if check is not None:
                head += (f"; model: measured {check['measured_original_ms']:.3f} ms -> "
                         f"{check['measured_rewritten_ms']:.3f} ms, predicted {check['predicted_rewritten_ms']:.3f} "
                         f"ms (predicted / measured {check['predicted_over_measured']:.3f})")
        if self.model_latency:
            m = self.model_latency
            timing = m.get("timing")
            measured = (f"measured {timing.ratio:.3f}x ({timing.rewritten_ms:.3f} ms vs {timing.original_ms:.3f} ms)"
                        if timing is not None else "nothing rewritten")
            head += (f"\nwhole-model latency bound {m['bound']:g}x: {measured} after {len(m['rounds'])} measured "
                     f"plan(s); planning took {sum(self.seconds.values()):.1f} s; timed {m['timed']}")
        if self.end_to_end:
            head += "\n" + self._end_to_end_lines()
        return head + "\n" + tabulate(rows, headers=headers, tablefmt=tablefmt)

    def _end_to_end_lines(self) -> str:
        e = self.end_to_end
        rounds = "; ".join(f"round {r['round']} ({r['weights']}): {r['changed_sites']} site(s), MACs "
                           f"{r['macs_fraction']:.3f}x, predicted {r['predicted']:.4f}, measured {r['measured']:.4f}"
                           for r in e.get("rounds", ()))
        uniform = "; ".join(f"{u['plan']}: MACs {u['macs_fraction']:.3f}x, measured {u['measured']:.4f}"
                            for u in e.get("uniform", ())) or "none meets the target"
        return (f"whole-model output error (rel. L2 on the calibration batches): predicted {e['predicted']:.4f}, "
                f"measured {e['measured']:.4f}; chosen: {e['chosen']} ({e['seconds']:.2f} s)\n"
                f"  budget rounds: {rounds}\n  uniform plans: {uniform}")

    def __str__(self) -> str:
        return self.table()


def _measured(result: Any) -> tuple[dict[str, float | None], dict[str, float]]:
    """Per site, from a ``RewriteResult`` / ``PassResult``: the weight error the pass reported and (verified only)
    the local output error."""
    weight_err: dict[str, float | None] = {}
    out_err: dict[str, float] = {}
    if result is None:
        return weight_err, out_err
    for r in getattr(getattr(result, "report", result), "records", ()) or ():
        if r.status == "rewritten":
            weight_err[r.site] = r.rel_error
    for check in getattr(getattr(result, "verification", None), "sites", ()) or ():
        if check.local is not None:
            out_err[check.site] = check.local.rel_l2
    return weight_err, out_err


def _plain(value: Any) -> Any:
    """Mappings and sequences as dicts and lists (JSON-ready)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
