"""Reports: immutable per-site records and the report that renders them as a table, Markdown and JSON.

Units: 1 MAC = one multiply-add, bias adds not counted; FLOPs = 2 x MACs. Every table says so.

>>> rec = SiteRecord(site="conv", pass_name="grouped", status="rewritten", params_before=72, params_after=36,
...                  macs_before=720, macs_after=360, rel_error=0.5)
>>> Report(records=(rec,)).totals()["macs_after"]
360
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from tabulate import tabulate

SCHEMA_VERSION = 1
UNITS_NOTE = "MACs: 1 MAC = one multiply-add, bias not counted; FLOPs = 2 x MACs. Params: elements."


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
        d = asdict(self)
        d["options"] = dict(self.options)
        d["details"] = dict(self.details)
        return d

    @property
    def changed(self) -> bool:
        return self.status in ("rewritten", "planned")


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_change(before: int | None, after: int | None, changed: bool) -> str:
    if not changed:
        return _fmt_int(before)
    return f"{_fmt_int(before)} -> {_fmt_int(after)}"


def _fmt_error(rec: SiteRecord) -> str:
    if rec.rel_error is None:
        return ""
    return "0 (exact)" if rec.exact else f"{rec.rel_error:.3g}"


@dataclass(frozen=True)
class Report:
    """The report of a plan or a rewrite: one record per site per pass, plus context (model, inputs, passes)."""

    records: tuple[SiteRecord, ...]
    title: str = "fxrewrite report"
    context: Mapping[str, Any] = field(default_factory=_frozen)
    extra_sections: tuple[tuple[str, str], ...] = ()  # (heading, preformatted text), e.g. verification

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

    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self.records:
            status = r.status if r.status != "skipped" else f"skipped: {r.code}"
            rows.append([r.site, r.pass_name, _fmt_change(r.params_before, r.params_after, r.changed),
                         _fmt_change(r.macs_before, r.macs_after, r.changed), _fmt_error(r), status])
        return rows

    HEADERS = ("site", "pass", "params", "MACs", "weight rel. error", "status")

    def _totals_lines(self) -> list[str]:
        t = self.totals()
        lines = [f"sites: {t['sites']}  changed: {t['changed']}  skipped: {t['skipped']}"]
        if t["changed"]:
            ratio = t["macs_after"] / t["macs_before"] if t["macs_before"] else float("nan")
            lines.append(f"changed sites: params {_fmt_int(t['params_before'])} -> {_fmt_int(t['params_after'])}, "
                         f"MACs {_fmt_int(t['macs_before'])} -> {_fmt_int(t['macs_after'])} ({ratio:.3f}x)")
        for key in ("model_macs_before", "model_macs_after", "model_params_before", "model_params_after"):
            if key in self.context:
                lines.append(f"{key.replace('_', ' ')}: {_fmt_int(int(self.context[key]))}")
        return lines

    def _skip_reasons(self) -> list[str]:
        return [r.reason if r.reason.startswith(f"{r.site}:") else f"{r.site}: {r.reason}"
                for r in self.records if r.status == "skipped" and r.reason]

    def __str__(self) -> str:
        parts = [self.title, tabulate(self._rows(), headers=self.HEADERS, tablefmt="simple"), UNITS_NOTE]
        parts += self._totals_lines()
        reasons = self._skip_reasons()
        if reasons:
            parts += ["skipped:"] + [f"  {line}" for line in reasons]
        for heading, text in self.extra_sections:
            parts += ["", heading, text]
        return "\n".join(parts)

    def to_markdown(self) -> str:
        parts = [f"## {self.title}", "", tabulate(self._rows(), headers=self.HEADERS, tablefmt="github"), "",
                 f"_{UNITS_NOTE}_", ""]
        parts += [f"- {line}" for line in self._totals_lines()]
        reasons = self._skip_reasons()
        if reasons:
            parts += ["", "Skipped:", ""] + [f"- `{line}`" for line in reasons]
        for heading, text in self.extra_sections:
            parts += ["", f"### {heading}", "", "```", text, "```"]
        return "\n".join(parts) + "\n"

    def to_dict(self) -> dict[str, Any]:
        import torch

        from fxrewrite import __version__
        return {
            "schema": "fxrewrite.report",
            "schema_version": SCHEMA_VERSION,
            "fxrewrite_version": __version__,
            "torch_version": torch.__version__,
            "units": {"macs": "multiply-accumulates (1 MAC = one multiply-add; bias not counted)",
                      "flops": "2 x MACs", "params": "elements", "rel_error": "||W - W'||_F / ||W||_F"},
            "title": self.title,
            "context": _jsonable(dict(self.context)),
            "totals": self.totals(),
            "records": [_jsonable(r.to_dict()) for r in self.records],
            "sections": {h: t for h, t in self.extra_sections},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)
