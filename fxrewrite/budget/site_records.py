"""Every site in a budget's records: ``BudgetPlan.apply`` returns the rewritten sites' records and, through
``every_site``, a skipped record for each other site of the graph (kept by the plan, or not considered and why), so
a budget's report lists every convolution, rewritten or not.

>>> from fxrewrite.budget.site_records import code_of
>>> code_of("module-hooks: the module has 1 forward hook")
('module-hooks', 'the module has 1 forward hook')
>>> code_of("not selected")
('not-selected', 'no selection rule includes this site.')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fxrewrite.graph.sites import ConvSite
from fxrewrite.report.report import SiteRecord

__all__ = ["code_of", "every_site"]


def code_of(reason: str) -> tuple[str, str]:
    """(code, sentence) of a ``BudgetPlan.excluded`` reason: ``"code: text"`` (a site's blocker or eligibility
    reasons; the first code where several are joined), else a code for the budget's own reasons."""
    head, sep, rest = reason.partition(": ")
    if sep and head and all(ch.isalnum() or ch == "-" for ch in head):
        return head, rest
    if reason == "not selected":
        return "not-selected", "no selection rule includes this site."
    if reason.startswith("no candidate is faster"):
        return "not-faster", reason
    return "no-saving", reason


def every_site(plan: Any, sites: Sequence[ConvSite], rewritten: Sequence[SiteRecord]) -> tuple[SiteRecord, ...]:
    """The ``rewritten`` records of ``plan`` (a ``BudgetPlan``) and a skipped record (pass ``budget``) for every other
    site in ``sites``, in graph order: ``budget-kept`` where the plan keeps the conv, else the reason it gives for
    excluding the site."""
    done = {r.site: r for r in rewritten}
    kept = {c.site: c for c in plan.choices if not c.changed}
    excluded = dict(plan.excluded)
    out: list[SiteRecord] = []
    seen: set[str] = set()
    for site in sites:
        if site.name in seen:
            continue
        seen.add(site.name)
        if site.name in done:
            out.append(done.pop(site.name))
            continue
        if site.name in kept:
            n = kept[site.name].candidates - 1
            code, why = "budget-kept", (f"the budget keeps the original conv: it had {n} cheaper candidate(s), and "
                                        f"the plan for {plan.target.describe()} has the least predicted error "
                                        "without changing it.")
        else:
            code, why = code_of(excluded.get(site.name, "not considered by the budget"))
        macs = site.macs if site.output_shape is not None else None
        out.append(SiteRecord(site=site.name, pass_name="budget", status="skipped", code=code, reason=why,
                              params_before=site.params, params_after=site.params, macs_before=macs,
                              macs_after=macs))
    return (*out, *done.values())
