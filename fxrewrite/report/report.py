"""Reports: immutable per-site records and the report that renders them as a table, Markdown and JSON.

A report holds the per-site records of the passes and, after a rewrite, the analytic costs of the whole model
before and after (``CostComparison``), the verification (``Verification``) and, on request, the
measured latency (``LatencyReport``). ``str(report)`` is the per-site table, a totals block and
one section per attachment; ``to_markdown()`` the same in Markdown; ``to_dict()``/``to_json()`` follow the
versioned JSON Schema in ``fxrewrite.report.schema`` (``schema_version`` says which).

Units: 1 MAC = one multiply-add, bias adds not counted; FLOPs = 2 x MACs. Every table says so.

>>> rec = SiteRecord(site="conv", pass_name="grouped", status="rewritten", params_before=72, params_after=36,
...                  macs_before=720, macs_after=360, rel_error=0.5)
>>> Report(records=(rec,)).totals()["macs_after"]
360
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from fxrewrite.util.formatting import fmt_int

if TYPE_CHECKING:
    from fxrewrite.graph.sites import HiddenConv
    from fxrewrite.measure.latency import LatencyReport
    from fxrewrite.verification.result import Verification

SCHEMA_VERSION = 1  # of fxrewrite.report.schema.REPORT_SCHEMA; bump on any incompatible change
UNITS_NOTE = "MACs: 1 MAC = one multiply-add, bias not counted; FLOPs = 2 x MACs. Params: elements."
UNITS: Mapping[str, str] = MappingProxyType({
    "macs": "multiply-accumulates (1 MAC = one multiply-add; bias not counted)",
    "flops": "2 x MACs",
    "params": "elements",
    "activation_bytes": "bytes of node outputs",
    "rel_error": "weight space: ||W - W'||_F / ||W||_F",
    "rel_l2": "output space: ||a - b||_2 / ||b||_2, b = the original model's value",
    "sqnr_db": "10 log10(||b||^2 / ||a - b||^2) decibels",
    "latency": "milliseconds, median of the timed runs",
    "non_finite_numbers": "the strings 'inf', '-inf', 'nan'",
})


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class SiteRecord:
    """What happened (or would happen, in a plan) at one convolution site for one pass.

    ``status`` is ``rewritten``, ``planned`` (a dry run would rewrite it) or ``skipped`` (``code``/``reason`` say
    why). ``rel_error`` is the weight-space relative error ||W - W'|| / ||W|| from the factorisation (0 for exact).
    """

    site: str
    pass_name: str
    status: str
    code: str | None = None
    reason: str = ""
    options: Mapping[str, Any] = field(default_factory=_frozen)
    rule: str | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    rel_error: float | None = None
    exact: bool | None = None
    details: Mapping[str, Any] = field(default_factory=_frozen)

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies, and a MappingProxyType (the frozen default) cannot be copied
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["options"] = dict(self.options)
        d["details"] = dict(self.details)
        return d

    @property
    def changed(self) -> bool:
        return self.status in ("rewritten", "planned")


def _fmt_change(before: int | None, after: int | None, changed: bool) -> str:
    if not changed:
        return fmt_int(before)
    return f"{fmt_int(before)} -> {fmt_int(after)}"


def _fmt_error(rec: SiteRecord) -> str:
    if rec.rel_error is None:
        return ""
    return "0 (exact)" if rec.exact else f"{rec.rel_error:.3g}"


def _fmt_delta(before: int | None, after: int | None) -> str:
    if before is None or after is None:
        return "?"
    delta = after - before
    return "0" if delta == 0 else ("+" if delta > 0 else "-") + fmt_int(abs(delta))


def _fmt_ratio(before: int | None, after: int | None) -> str:
    return f"{after / before:.3f}x" if before and after is not None else "-"


@dataclass(frozen=True)
class SiteCost:
    """Analytic cost of one rewritten site before (the original conv) and after (every node of its subgraph)."""

    site: str
    params_before: int | None
    params_after: int | None
    macs_before: int | None
    macs_after: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CostComparison:
    """Analytic costs (``measure.cost.model_cost``) of the whole model before and after, and per rewritten site.

    >>> c = CostComparison(100, 60, 1000, 400, 64, 80, (SiteCost("conv", 90, 50, 900, 300),))
    >>> c.rows()[1]
    ['MACs', '1.00K', '400', '-600', '0.400x']
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    activation_bytes_before: int
    activation_bytes_after: int
    sites: tuple[SiteCost, ...] = ()

    HEADERS = ("quantity", "before", "after", "delta", "after/before")
    SITE_HEADERS = ("site", "params", "delta params", "MACs", "delta MACs")

    def rows(self) -> list[list[str]]:
        return [[label, fmt_int(b), fmt_int(a), _fmt_delta(b, a), _fmt_ratio(b, a)] for label, b, a in (
            ("params", self.params_before, self.params_after), ("MACs", self.macs_before, self.macs_after),
            ("activation bytes", self.activation_bytes_before, self.activation_bytes_after))]

    def site_rows(self) -> list[list[str]]:
        return [[s.site, _fmt_change(s.params_before, s.params_after, True), _fmt_delta(s.params_before,
                 s.params_after), _fmt_change(s.macs_before, s.macs_after, True), _fmt_delta(s.macs_before,
                 s.macs_after)] for s in self.sites]

    def table(self, tablefmt: str = "simple") -> str:
        parts = ["whole model (analytic, fxrewrite.measure.cost; activation bytes = sum of node output sizes):",
                 tabulate(self.rows(), headers=self.HEADERS, tablefmt=tablefmt, disable_numparse=True)]
        if self.sites:
            parts += ["per rewritten site (the original conv -> every node of its replacement):",
                      tabulate(self.site_rows(), headers=self.SITE_HEADERS, tablefmt=tablefmt,
                               disable_numparse=True)]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = [s.to_dict() for s in self.sites]
        return d

    @staticmethod
    def from_verification(v: Verification) -> CostComparison | None:
        """The costs a verification measured on its own propagated graphs (None when the cost model failed)."""
        if v.cost_before is None or v.cost_after is None:
            return None
        def get(cost: Any, key: str) -> int | None:
            return None if cost is None else int(getattr(cost, key))

        sites = tuple(SiteCost(s.site, get(s.cost_before, "params"), get(s.cost_after, "params"),
                               get(s.cost_before, "macs"), get(s.cost_after, "macs")) for s in v.sites)
        b, a = v.cost_before, v.cost_after
        return CostComparison(b.params, a.params, b.macs, a.macs, b.activation_bytes, a.activation_bytes, sites)


@dataclass(frozen=True)
class Report:
    """The report of a plan or a rewrite: one record per site per pass, plus context (model, inputs, passes).

    ``not_visible`` lists the model's convolutions that are not sites (inside a leaf module, or never called by the
    traced forward), each with reason code ``not-visible``; the JSON document has them in ``context["not_visible"]``.
    When a rule selected a site, the table shows the winning rule (and its option overrides) in a ``rule`` column.
    """

    records: tuple[SiteRecord, ...]
    title: str = "fxrewrite report"
    context: Mapping[str, Any] = field(default_factory=_frozen)
    extra_sections: tuple[tuple[str, str], ...] = ()  # (heading, preformatted text)
    costs: CostComparison | None = None
    verification: Verification | None = None
    latency: LatencyReport | None = None
    not_visible: tuple[HiddenConv, ...] = ()

    @property
    def ok(self) -> bool | None:
        """The verification verdict (None when the report carries no verification)."""
        return None if self.verification is None else self.verification.ok

    def totals(self) -> dict[str, int]:
        """Totals over the rewritten/planned sites (MACs in multiply-adds, bias not counted)."""
        changed = [r for r in self.records if r.changed]
        return {
            "sites": len({r.site for r in self.records}),
            "changed": len(changed),
            "skipped": sum(1 for r in self.records if r.status == "skipped"),
            "params_before": sum(r.params_before for r in changed),
            "params_after": sum(r.params_after for r in changed),
            "macs_before": sum(r.macs_before or 0 for r in changed),
            "macs_after": sum(r.macs_after or 0 for r in changed),
        }

    def _site_check(self, site: str) -> Any:
        """The verification of ``site`` or of the rewritten site it is nested in (``conv.1`` -> ``conv``)."""
        if self.verification is None:
            return None
        checks = {s.site: s for s in self.verification.sites}
        while site not in checks and "." in site:
            site = site.rpartition(".")[0]
        return checks.get(site)

    def _rows(self) -> list[list[str]]:
        rows = []
        numerics = self.verification is not None and self.verification.numerics_checked
        for r in self.records:
            status = r.status if r.status != "skipped" else f"skipped: {r.code}"
            check = self._site_check(r.site) if r.changed else None
            if check is not None and check.status == "failed":
                status += "; verify: FAILED"
            row = [r.site, r.pass_name, *([r.rule or "-"] if self._has_rules else []),
                   _fmt_change(r.params_before, r.params_after, r.changed),
                   _fmt_change(r.macs_before, r.macs_after, r.changed), _fmt_error(r)]
            if numerics:
                row.append(_fmt_output_error(check))
            rows.append([*row, status])
        return rows

    HEADERS = ("site", "pass", "params", "MACs", "weight rel. error", "status")
    VERIFIED_HEADERS = ("site", "pass", "params", "MACs", "weight rel. error", "output rel. L2 local / accum.",
                        "status")

    @property
    def _has_rules(self) -> bool:
        return any(r.rule is not None for r in self.records)

    @property
    def _headers(self) -> tuple[str, ...]:
        numerics = self.verification is not None and self.verification.numerics_checked
        headers = self.VERIFIED_HEADERS if numerics else self.HEADERS
        return (*headers[:2], "rule", *headers[2:]) if self._has_rules else headers

    def _sections(self, tablefmt: str) -> list[tuple[str, str]]:
        """(heading, text) of the costs, verification and latency sections, then the extra sections."""
        out = []
        if self.costs is not None:
            out.append(("costs", self.costs.table(tablefmt)))
        if self.verification is not None:
            out.append(("verification", self.verification.table(tablefmt, summary=False)))
        if self.latency is not None:
            out.append(("latency", self.latency.table(tablefmt)))
        return out

    def _count_lines(self) -> list[str]:
        t = self.totals()
        lines = [f"sites: {t['sites']}  changed: {t['changed']}  skipped: {t['skipped']}"]
        if len(self.records) != t["sites"]:  # changed + skipped count records: say why they outnumber the sites
            lines[0] += (f"  ({len(self.records)} records for {t['sites']} sites: a module called from several places "
                         "has a record per call, a site a record per pass)")
        if t["changed"]:
            ratio = t["macs_after"] / t["macs_before"] if t["macs_before"] else float("nan")
            lines.append(f"changed sites: params {fmt_int(t['params_before'])} -> {fmt_int(t['params_after'])}, "
                         f"MACs {fmt_int(t['macs_before'])} -> {fmt_int(t['macs_after'])} ({ratio:.3f}x)")
        for key in ("model_macs_before", "model_macs_after", "model_params_before", "model_params_after"):
            if key in self.context:
                lines.append(f"{key.replace('_', ' ')}: {fmt_int(int(self.context[key]))}")
        dropped = [f"{r.site} ({r.details['dropped_hooks']})" for r in self.records if r.details.get("dropped_hooks")]
        if dropped:
            lines.append(f"hooks dropped (drop_hooks=True): {', '.join(dropped)}")
        return lines

    def not_visible_lines(self) -> list[str]:
        """The ``not visible:`` block: one line per convolution that is not a site (empty when there are none)."""
        if not self.not_visible:
            return []
        return ["not visible (convolutions the graph does not call; never rewritten):"] + [
            f"  {h.name}: {h.reason.code}: {h.reason.text}" for h in self.not_visible]

    def _skip_reasons(self) -> list[str]:
        return [r.reason if r.reason.startswith(f"{r.site}:") else f"{r.site}: {r.reason}"
                for r in self.records if r.status == "skipped" and r.reason]

    def _totals_lines(self) -> list[str]:
        lines = self._count_lines()
        if self.verification is not None:
            lines.append(self.verification.summary())
        return lines

    def __str__(self) -> str:
        parts = [self.title, tabulate(self._rows(), headers=self._headers, tablefmt="simple"), UNITS_NOTE]
        parts += self._totals_lines()
        reasons = self._skip_reasons()
        if reasons:
            parts += ["skipped:"] + [f"  {line}" for line in reasons]
        parts += self.not_visible_lines()
        for heading, text in self._sections("simple"):
            parts += ["", f"== {heading} ==", text]
        for heading, text in self.extra_sections:
            parts += ["", heading, text]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        parts = [f"## {self.title}", "", tabulate(self._rows(), headers=self._headers, tablefmt="github"), "",
                 f"_{UNITS_NOTE}_", ""]
        parts += [f"- {line}" for line in self._totals_lines()]
        reasons = self._skip_reasons()
        if reasons:
            parts += ["", "Skipped:", ""] + [f"- `{line}`" for line in reasons]
        if self.not_visible:
            parts += ["", "Not visible (convolutions the graph does not call; never rewritten):", ""]
            parts += [f"- `{h.name}: {h.reason.code}: {h.reason.text}`" for h in self.not_visible]
        for heading, text in self._sections("github"):
            parts += ["", f"### {heading.capitalize()}", "", _markdown_section(text)]
        for heading, text in self.extra_sections:
            parts += ["", f"### {heading}", "", "```", text, "```"]
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        import torch

        from fxrewrite.version import __version__
        return {
            "schema": "fxrewrite.report.report",
            "schema_version": SCHEMA_VERSION,
            "fxrewrite_version": __version__,
            "torch_version": torch.__version__,
            "units": dict(UNITS),
            "title": self.title,
            "input_shapes": _jsonable(self.context.get("input_shapes", [])),
            "passes": _jsonable(self.context.get("passes", [])),
            "context": _jsonable(dict(self.context) | ({"not_visible": [
                {"name": h.name, "container": h.container, "code": h.reason.code, "reason": h.reason.text}
                for h in self.not_visible]} if self.not_visible else {})),
            "totals": self.totals(),
            "records": [_jsonable(r.to_dict()) for r in self.records],
            "costs": self.costs.to_dict() if self.costs is not None else None,
            "verification": _jsonable(self.verification.to_dict()) if self.verification is not None else None,
            "latency": _jsonable(self.latency.to_dict()) if self.latency is not None else None,
            "sections": {h: t for h, t in self.extra_sections},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)  # strict JSON: inf/nan are strings


def _fmt_output_error(check: Any) -> str:
    if check is None or check.local is None:
        return "-"
    from fxrewrite.verification.formatting import fmt_rel
    return f"{fmt_rel(check.local)} / {fmt_rel(check.accumulated)}"


def _markdown_section(text: str) -> str:
    """A section whose tables are already github tables: prose lines become paragraphs, indented lines (failures)
    list items, and runs of blank lines collapse to one."""
    out: list[str] = []
    for line in text.splitlines():
        is_table = line.startswith("|")
        if line.startswith("  "):
            item = f"- `{line.strip()}`"
            out += [item] if out and out[-1].startswith("- ") else ["", item]
        elif line and not is_table:
            out += ["", line, ""]
        elif is_table and out and out[-1] and not out[-1].startswith("|"):
            out += ["", line]
        else:
            out.append(line)
    collapsed: list[str] = []
    for line in out:
        if line or (collapsed and collapsed[-1]):
            collapsed.append(line)
    return "\n".join(collapsed).strip()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")  # JSON has no inf/nan
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)
