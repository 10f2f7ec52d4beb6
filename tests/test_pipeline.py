"""Tests for the pass infrastructure: Pass, PassResult, PassManager and pipeline strings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import models
import pytest
import torch
from models import example_input
from torch import nn
from torch.fx.passes.infra.pass_manager import PassManager as TorchPassManager

from fxrewrite.errors import ConfigError, PassFailure
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import ConvSite, find_sites
from fxrewrite.passes import (
    REGISTRY,
    ChannelShuffle,
    DepthwiseSeparable,
    Grouped,
    Pass,
    PassManager,
    PassResult,
    parse_pipeline,
)
from fxrewrite.passes.conv_rewrite import ConvRewritePass
from fxrewrite.passes.interface import Built
from fxrewrite.report.report import SiteRecord


def test_pipeline_string_parses_into_typed_pass_objects() -> None:
    passes = parse_pipeline("grouped{groups=4},channel-shuffle")
    assert passes == [Grouped(groups=4), ChannelShuffle()]
    assert parse_pipeline("  grouped { groups = 8 , init = random } , depthwise-separable{rank=exact}") == [
        Grouped(groups=8, init="random"), DepthwiseSeparable(rank="exact")]
    assert parse_pipeline("channel-shuffle{fold=false, rule=all}") == [ChannelShuffle(rule="all", fold=False)]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_pass_is_a_frozen_dataclass_whose_spec_round_trips(name: str) -> None:
    cls = REGISTRY[name]
    p = cls()
    assert p.name == name and p.description
    assert dataclasses.is_dataclass(p)
    field = dataclasses.fields(p)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(p, field, getattr(p, field))
    assert parse_pipeline(p.spec()) == [p]


def test_unknown_pass_lists_the_valid_passes() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline("groupd{groups=4}")
    assert "unknown pass 'groupd'" in str(info.value)
    assert "valid passes: " + ", ".join(sorted(REGISTRY)) in str(info.value)


def test_unknown_option_lists_the_valid_options() -> None:
    with pytest.raises(ConfigError, match=r"grouped: unknown option 'group'; valid options: groups=4, init=block"):
        parse_pipeline("grouped{group=4}")


def test_every_problem_is_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline("nope,grouped{x=1},depthwise-separable{rank=0}")
    message = str(info.value)
    assert "unknown pass 'nope'" in message
    assert "unknown option 'x'" in message
    assert "rank must be a positive integer or 'exact', got 0" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("grouped{groups=1}", "groups must be an integer >= 2, got 1"),
    ("grouped{groups=true}", "groups must be an integer >= 2, got True"),
    ("grouped{init=svd}", "init must be one of"),
    ("channel-shuffle{fold=1}", "fold must be true or false"),
    ("grouped{groups=4", "unbalanced '{'"),
    ("grouped}", "unbalanced '}'"),
    ("grouped{groups}", "option 'groups' needs a value"),
    ("grouped{groups=2, groups=4}", "grouped: option 'groups' is given more than once"),
    ("depthwise-separable{rank=2,init=svd,rank=2}", "depthwise-separable: option 'rank' is given more than once"),
    ("", "empty pipeline"),
])
def test_invalid_pipelines(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        parse_pipeline(text)


def test_a_repeated_option_names_the_option_the_pass_and_both_values() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pipeline("depthwise-separable{rank=1},grouped{groups=2, init=block, groups=4}")
    assert str(info.value) == ("invalid pipeline: grouped: option 'groups' is given more than once (groups=2, "
                               "groups=4); give it once")


def gm_of(model: nn.Module) -> torch.fx.GraphModule:
    gm = trace(model)
    propagate_shapes(gm, (example_input(model),))
    return gm


def test_pass_result_shape_and_records(seeded: None) -> None:
    gm = gm_of(models.Plain())
    result = Grouped(groups=2)(gm)
    assert isinstance(result, PassResult) and result.modified
    assert all(isinstance(r, SiteRecord) for r in result.records)
    # conv1 (3 inputs) and dw (depthwise) cannot be grouped by 2; conv2 and pw can
    assert [(r.site, r.status, r.code) for r in result.records] == [
        ("conv1", "skipped", "channels-not-divisible"), ("conv2", "rewritten", None),
        ("dw", "skipped", "already-depthwise"), ("pw", "rewritten", None)]


def test_torch_pass_manager_accepts_our_passes(seeded: None) -> None:
    model = models.Plain().eval()
    x = example_input(model)
    gm = gm_of(model)
    result = TorchPassManager(passes=[Grouped(groups=2), DepthwiseSeparable(rank="exact")], steps=3)(gm)
    out = result.graph_module
    assert result.modified
    out.graph.lint()
    # conv2 was grouped by 2, then split: its pointwise part keeps the 2 groups
    assert isinstance(out.conv2, nn.Sequential) and out.conv2[1].groups == 2
    # conv1 3->16 k3 is split exactly into depthwise + pointwise; its function is unchanged
    conv1 = out.get_submodule("conv1")
    assert isinstance(conv1, nn.Sequential) and conv1[0].groups == 3
    with torch.no_grad():
        torch.testing.assert_close(conv1(x), model.conv1(x), rtol=1e-4, atol=1e-5)


def test_our_pass_manager_runs_lints_and_recompiles(seeded: None) -> None:
    model = models.Residual().eval()
    gm = gm_of(model)
    result = PassManager(parse_pipeline("depthwise-separable{rank=exact}"))(gm)
    assert result.modified
    # recompiled: the code calls the new children (kxk then 1x1) at the old qualified names
    code = result.graph_module.code
    for name in ("stem", "body.0", "body.2", "grouped"):
        assert f"{name.replace('.', '_')}_0 = " in code and f"{name.replace('.', '_')}_1 = " in code
    assert "shortcut = self.shortcut(" in code  # the 1x1 shortcut is not split
    result.graph_module.graph.lint()
    x = example_input(model)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-4)
    assert [r.site for r in result.records if r.status == "rewritten"] == ["stem", "body.0", "body.2", "grouped"]


@dataclass(frozen=True)
class Exploding(ConvRewritePass):
    """A test pass whose replacement builder fails at one site."""

    name = "exploding"
    description = "raises at the site named `at`"
    kind = "depthwise-separable"
    at: str = "conv2"

    def build(self, site: ConvSite, conv: nn.Conv2d) -> Built:
        if site.name == self.at:
            raise ValueError("boom")
        return Built(nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding),
                     None, False)


@dataclass(frozen=True)
class Broken(Pass):
    """A test pass that fails outright."""

    name = "broken"
    description = "raises RuntimeError"

    def run(self, gm: torch.fx.GraphModule, rules=()) -> PassResult:  # type: ignore[no-untyped-def]
        raise RuntimeError("kaput")


def test_pass_manager_wraps_errors_with_pass_and_site(seeded: None) -> None:
    gm = gm_of(models.Plain())
    with pytest.raises(PassFailure) as info:
        PassManager([Exploding()])(gm)
    assert "'exploding'" in str(info.value) and "'conv2'" in str(info.value) and "boom" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(PassFailure) as info:
        PassManager([Grouped(groups=2), Broken()])(gm_of(models.Plain()))
    assert "'broken'" in str(info.value) and "kaput" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_plan_changes_nothing_and_agrees_with_run(seeded: None) -> None:
    gm = gm_of(models.Residual())
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    manager = PassManager(parse_pipeline("grouped{groups=4}"))
    planned = manager.plan(gm)
    assert gm.code == code
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
    ran = manager(gm).records
    assert [(r.site, r.status == "planned", r.code) for r in planned] == [
        (r.site, r.status == "rewritten", r.code) for r in ran]
    # the residual's grouped conv already has groups=4: the reason names the valid larger counts
    grouped = next(r for r in ran if r.site == "grouped")
    assert grouped.code == "already-grouped" and "[8, 16, 32]" in grouped.reason


def test_a_second_run_changes_nothing(seeded: None) -> None:
    gm = gm_of(models.Plain())
    first = PassManager(parse_pipeline("grouped{groups=2}"))(gm)
    assert first.modified
    n_before = len(find_sites(first.graph_module))
    second = Grouped(groups=2)(first.graph_module)
    assert not second.modified
    assert all(r.status == "skipped" for r in second.records)
    assert len(find_sites(second.graph_module)) == n_before
