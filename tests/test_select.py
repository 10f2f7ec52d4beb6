"""Tests for fxrewrite.graph.select: rule forms, precedence, min_channels, skip rules and unmatched-rule errors."""

from __future__ import annotations

import re

import models
import pytest
import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import trace
from fxrewrite.graph.select import Rule, parse_rules, resolve
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import ConvSite, find_sites


@pytest.fixture(scope="module")
def sites() -> list[ConvSite]:
    """Residual: stem 8->16, body.0 16->16, body.2 16->32, shortcut 16->32 (1x1), grouped 32->32; plus a
    SameConv subclass site "same" 32->8 (via a wrapper)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("res", models.Residual())
    model.add_module("same", models.SameConv(32, 8, 3))
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(1, 8, 8, 8),))
    return find_sites(gm)


def selected(rules: list, sites: list[ConvSite]) -> dict[str, bool]:
    return {name: s.selected for name, s in resolve(parse_rules(rules), sites).items()}


def winner(rules: list, sites: list[ConvSite], name: str) -> Rule | None:
    return resolve(parse_rules(rules), sites)[name].rule


def test_site_names(sites: list[ConvSite]) -> None:
    assert [s.name for s in sites] == ["res.stem", "res.body.0", "res.body.2", "res.shortcut", "res.grouped", "same"]


def test_forms_and_ranks() -> None:
    rules = parse_rules(["res.stem", "res.body.*", "re:res\\.body\\.\\d", re.compile("x"), nn.Conv2d, "type:SameConv",
                         Rule(None), "!res.stem"])
    assert [(r.form, r.rank, r.skip) for r in rules] == [
        ("exact", 3, False), ("pattern", 2, False), ("pattern", 2, False), ("pattern", 2, False), ("type", 1, False),
        ("type", 1, False), ("global", 0, False), ("exact", 3, True)]


def test_no_rules_selects_everything(sites: list[ConvSite]) -> None:
    resolved = resolve([], sites)
    assert all(s.selected and s.rule is None for s in resolved.values())
    assert list(resolved) == [s.name for s in sites]


def test_each_form_matches_what_it_says(sites: list[ConvSite]) -> None:
    everything = {s.name: False for s in sites}
    assert selected(["res.stem"], sites) == everything | {"res.stem": True}
    assert selected(["res.body.*"], sites) == everything | {"res.body.0": True, "res.body.2": True}
    assert selected(["re:res\\.(stem|shortcut)"], sites) == everything | {"res.stem": True, "res.shortcut": True}
    assert selected([re.compile(r".*\.body\.2")], sites) == everything | {"res.body.2": True}
    conv2d = {s.name: s.module_type == "Conv2d" for s in sites}
    assert selected([nn.Conv2d], sites) == conv2d
    assert selected(["type:Conv2d"], sites) == conv2d
    assert selected([models.SameConv], sites) == everything | {"same": True}
    assert selected([Rule(None)], sites) == {s.name: True for s in sites}


def test_regex_is_a_full_match(sites: list[ConvSite]) -> None:
    with pytest.raises(ConfigError, match="matches no convolution site"):
        resolve(parse_rules(["re:body"]), sites)  # "body" alone is not a whole name


def test_precedence_exact_over_pattern_over_type_over_global(sites: list[ConvSite]) -> None:
    g = Rule(None, options={"rank": 1})
    t = Rule(nn.Conv2d, options={"rank": 2})
    p = Rule("res.body.*", options={"rank": 3})
    e = Rule("res.body.0", options={"rank": 4})
    for order in ([g, t, p, e], [e, p, t, g], [p, e, g, t]):  # order does not matter across ranks
        resolved = resolve(order, sites)
        assert resolved["res.body.0"].rule is e
        assert resolved["res.body.2"].rule is p
        assert resolved["res.stem"].rule is t
        assert resolved["same"].rule is g  # a SameConv is not type Conv2d
        assert dict(resolved["res.body.0"].options) == {"rank": 4}


def test_later_rule_wins_a_tie(sites: list[ConvSite]) -> None:
    a, b = Rule("res.*", options={"rank": 1}), Rule("re:res\\..*", options={"rank": 2})
    assert winner([a, b], sites, "res.stem") is b
    assert winner([b, a], sites, "res.stem") is a
    skip, keep = Rule("res.stem", skip=True), Rule("res.stem")
    assert selected([skip, keep], sites)["res.stem"] is True
    assert selected([keep, skip], sites)["res.stem"] is False


def test_min_channels(sites: list[ConvSite]) -> None:
    # input channels: stem 8, body.0 16, body.2 16, shortcut 16, grouped 32, same 32
    assert selected([Rule(None, min_channels=32)], sites) == {
        "res.stem": False, "res.body.0": False, "res.body.2": False, "res.shortcut": False, "res.grouped": True,
        "same": True}
    assert selected([Rule("res.*", min_channels=16)], sites) == {
        "res.stem": False, "res.body.0": True, "res.body.2": True, "res.shortcut": True, "res.grouped": True,
        "same": False}


def test_skip_rules(sites: list[ConvSite]) -> None:
    # only exclusions: everything else is selected
    assert selected(["!res.body.*"], sites) == {
        "res.stem": True, "res.body.0": False, "res.body.2": False, "res.shortcut": True, "res.grouped": True,
        "same": True}
    # an inclusion plus a more specific exclusion
    assert selected(["res.*", "!res.shortcut"], sites) == {
        "res.stem": True, "res.body.0": True, "res.body.2": True, "res.shortcut": False, "res.grouped": True,
        "same": False}
    # a skip rule of lower rank loses to an exact inclusion
    assert selected(["!res.*", "res.stem"], sites)["res.stem"] is True


def test_unmatched_rule_is_an_error_naming_the_closest_sites(sites: list[ConvSite]) -> None:
    with pytest.raises(ConfigError, match=r"rule 'res.stm' matches no convolution site; closest: res.stem"):
        resolve(parse_rules(["res.stm"]), sites)
    with pytest.raises(ConfigError) as info:  # every unmatched rule is reported, not just the first
        resolve(parse_rules(["res.stem", "res.body.9", "res.shortcat"]), sites)
    message = str(info.value)
    assert re.search(r"'res.body.9' matches no convolution site; closest: [^;]*res.body.0", message)
    assert "'res.shortcat'" in message and "closest: res.shortcut" in message
    assert "'res.stem'" not in message


def test_unmatched_type_and_min_channels_rules_explain_why(sites: list[ConvSite]) -> None:
    with pytest.raises(ConfigError, match="module types present: Conv2d, SameConv"):
        resolve(parse_rules([nn.ConvTranspose2d]), sites)
    with pytest.raises(ConfigError, match=r"at most 16 input channels \(< min_channels=64\)"):
        resolve([Rule("res.body.*", min_channels=64)], sites)


def test_bad_selectors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="invalid regular expression"):
        parse_rules(["re:layer[1"])
    with pytest.raises(ConfigError, match="empty selector"):
        parse_rules(["!"])
    with pytest.raises(ConfigError, match="select entries must be"):
        parse_rules([3])  # type: ignore[list-item]


def test_plan_applies_selection_and_reports_the_rule(seeded: None) -> None:
    import fxrewrite
    model = models.Residual()
    x = torch.randn(1, 8, 8, 8)
    plan = fxrewrite.plan(model, (x,), "grouped{groups=2}", select=["body.*", "!body.2"])
    by_site = {r.site: r for r in plan.records}
    assert by_site["body.0"].status == "planned" and by_site["body.0"].rule == "body.*"
    assert by_site["body.2"].status == "skipped" and by_site["body.2"].code == "not-selected"
    assert by_site["stem"].code == "not-selected"
    with pytest.raises(ConfigError, match=r"rule 'body\.1' matches no convolution site; closest: .*body\.0"):
        fxrewrite.plan(model, (x,), "grouped{groups=2}", select=["body.1"])
    with pytest.raises(ConfigError, match="closest: stem"):
        fxrewrite.plan(model, (x,), select=["stm"])  # a listing without passes checks rules too
