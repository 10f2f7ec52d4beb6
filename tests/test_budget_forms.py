"""Budget forms come from the passes (``Pass.budget_forms`` of every registered pass, read at call time) and form
strings are read with the pipeline grammar (``fxrewrite.passes.pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
import torch

from fxrewrite.budget.choose import choose_plan
from fxrewrite.budget.forms import form_names, make_form, parse_forms
from fxrewrite.budget.target import Target
from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.passes import REGISTRY, Grouped, register, unregister
from fxrewrite.passes.grouped import GroupedForm


@dataclass(frozen=True)
class HalfGroupedForm:
    """Offers only ``groups = in_channels / 2``, applied by the pass below (a plain factory, not a dataclass form)."""

    name: str = "half-grouped"
    pass_name: str = "half-grouped"
    calibrated = True

    def candidates(self, site: Any, weight: torch.Tensor, stats: Any = None) -> list[Any]:
        inner = GroupedForm(groups=(site.spec.in_channels // 2,), name=self.name, pass_name=self.pass_name)
        return inner.candidates(site, weight, stats)


def half_grouped(**options: Any) -> HalfGroupedForm:
    if options:
        raise TypeError(f"takes no options, got {sorted(options)}")
    return HalfGroupedForm()


@dataclass(frozen=True)
class HalfGrouped(Grouped):
    name = "half-grouped"
    budget_forms = MappingProxyType({"half-grouped": half_grouped})


@pytest.fixture
def registered() -> Any:
    register(HalfGrouped)
    try:
        yield HalfGrouped
    finally:
        unregister(HalfGrouped.name)


def test_builtin_forms_are_declared_by_their_passes() -> None:
    assert form_names() == ("depthwise-separable", "grouped-separable", "grouped", "tucker2")
    owners = {form: cls.name for cls in REGISTRY.values() for form in cls.budget_forms}
    assert owners == {"depthwise-separable": "depthwise-separable", "grouped-separable": "grouped-separable",
                      "grouped": "grouped", "tucker2": "grouped-bottleneck"}


def test_a_registered_pass_offers_its_forms_to_budgets(registered: type) -> None:
    assert "half-grouped" in form_names()
    assert make_form("half-grouped") == HalfGroupedForm()
    with pytest.raises(ConfigError, match="budget form 'half-grouped': takes no options"):
        make_form("half-grouped{groups=2}")
    torch.manual_seed(0)
    gm = trace(torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)))
    propagate_shapes(gm, (torch.randn(1, 8, 8, 8),))
    plan = choose_plan(gm, Target(macs=0.6), forms=["half-grouped"])
    assert [c.candidate.spec() for c in plan.changed] and {c.candidate.form for c in plan.changed} == {"half-grouped"}
    assert plan.apply(gm).graph_module.get_submodule("1").groups == 8


def test_forms_are_read_at_call_time(registered: type) -> None:
    unregister(HalfGrouped.name)
    try:
        with pytest.raises(ConfigError, match="unknown budget form 'half-grouped'"):
            make_form("half-grouped")
    finally:
        register(HalfGrouped)


@pytest.mark.parametrize(("text", "match"), [
    ("grouped{groups=2, groups=4}", "given more than once"),
    ("grouped{groups}", "needs a value"),
    ("grouped{groups=two}", "must be integers"),
    ("grouped{groups=2", "unbalanced"),
    ("grouped{groups=2}{groups=4}", "unknown budget form"),
])
def test_form_strings_use_the_pipeline_grammar(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_forms(text)


def test_tuple_options_take_several_values() -> None:
    assert make_form("grouped-separable{groups=4|8, max_rank=3}") == make_form(
        "grouped-separable{ groups = 4|8 , max_rank=3 }")
    assert make_form("grouped{groups=4}").groups == (4,)  # type: ignore[attr-defined]
