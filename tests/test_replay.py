"""Tests for io.replay: plans that rebuild a rewritten architecture on a fresh model, then load its weights."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.graph.select import Rule
from fxrewrite.io.replay import PlanEntry, PlanMismatch, RewritePlan, apply_plan, load_rewritten, plan_from_result


class Tiny(nn.Module):
    """stem 3x3 -> BN -> relu -> grouped-able 3x3 -> relu -> 1x1 -> pool: every pass has a site here."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.mid(x))
        return self.head(x).mean((2, 3))


def _fresh(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(7))


def _rebuild(model: nn.Module, result: fxrewrite.RewriteResult, plan: RewritePlan) -> torch.fx.GraphModule:
    rebuilt = apply_plan(model, plan)
    rebuilt.load_state_dict(result.module.state_dict(), strict=True)
    return rebuilt.eval()


@pytest.mark.parametrize("pipeline", [
    "depthwise-separable{rank=1}",
    "grouped-separable{groups=4, rank=2},grouped{groups=2}",
    "grouped{groups=4},channel-shuffle{rule=all, fold=false}",
])
def test_replay_rebuilds_the_same_module(pipeline: str) -> None:
    original, x = _fresh(0), _x()
    result = fxrewrite.rewrite(original, (x,), passes=pipeline)
    plan = RewritePlan.from_json(plan_from_result(result).to_json())
    rebuilt = _rebuild(_fresh(1), result, plan)  # different initial weights: everything comes from the state_dict
    expected = result.module.eval()(x)
    torch.testing.assert_close(rebuilt(x), expected, rtol=0, atol=0)
    shapes = {k: tuple(v.shape) for k, v in result.module.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == shapes
    assert len(plan.entries) == sum(r.status == "rewritten" for r in result.report.records)
    rebuilt.graph.lint()


def test_plan_entries_follow_application_order() -> None:
    result = fxrewrite.rewrite(_fresh(0), (_x(),), passes="depthwise-separable{rank=2},grouped{groups=2}")
    rewritten = [(r.site, r.pass_name) for r in result.report.records if r.status == "rewritten"]
    plan = plan_from_result(result)
    assert [(e.site, e.pass_name) for e in plan.entries] == rewritten
    # the second pass rewrote convolutions the first one created, so order matters for the replay
    assert ("mid.1", "grouped") in rewritten and rewritten.index(("mid", "depthwise-separable")) < rewritten.index(
        ("mid.1", "grouped"))
    rebuilt = _rebuild(_fresh(3), result, plan)
    torch.testing.assert_close(rebuilt(_x()), result.module.eval()(_x()), rtol=0, atol=0)


def test_plan_records_rule_overrides() -> None:
    result = fxrewrite.rewrite(_fresh(0), (_x(),), passes="depthwise-separable{rank=1}",
                               select=[Rule(None), Rule("mid", options={"rank": 3})])
    plan = plan_from_result(result)
    assert dict(next(e for e in plan.entries if e.site == "mid").options)["rank"] == 3
    assert dict(next(e for e in plan.entries if e.site == "stem").options)["rank"] == 1
    rebuilt = _rebuild(_fresh(3), result, plan)
    assert rebuilt.get_submodule("mid.0").out_channels == 16 * 3
    torch.testing.assert_close(rebuilt(_x()), result.module.eval()(_x()), rtol=0, atol=0)


def test_replay_touches_exactly_the_planned_sites() -> None:
    result = fxrewrite.rewrite(_fresh(0), (_x(),), passes="grouped{groups=2}", select=["mid"])
    rebuilt = apply_plan(_fresh(5), plan_from_result(result))
    groups = {name: m.groups for name, m in rebuilt.named_modules() if isinstance(m, nn.Conv2d)}
    assert groups == {"stem": 1, "mid": 2, "head": 1}


def test_plan_json_round_trip_and_schema() -> None:
    plan = RewritePlan((PlanEntry("a.b", "grouped", {"groups": 4, "init": "block"}),), ((1, 3, 8, 8),))
    data = json.loads(plan.to_json())
    assert data["schema"] == "fxrewrite.plan" and data["schema_version"] == 1
    assert data["entries"] == [{"site": "a.b", "pass": "grouped", "options": {"groups": 4, "init": "block"}}]
    assert data["torch_version"] == torch.__version__ and data["fxrewrite_version"] == fxrewrite.__version__
    back = RewritePlan.from_json(plan.to_json())
    assert back.to_dict() == plan.to_dict()
    assert back.input_shapes == ((1, 3, 8, 8),)
    with pytest.raises(ConfigError, match="newer"):
        RewritePlan.from_dict(data | {"schema_version": 99})
    with pytest.raises(ConfigError, match="not an fxrewrite plan"):
        RewritePlan.from_dict({"schema": "other"})


def test_plan_from_a_dry_run_is_refused() -> None:
    dry = fxrewrite.plan(_fresh(0), (_x(),), passes="grouped{groups=2}")
    with pytest.raises(ConfigError, match="dry-run"):
        plan_from_result(dry)


def test_plan_that_does_not_fit_the_model_names_the_site() -> None:
    missing = RewritePlan((PlanEntry("nope", "grouped", {"groups": 2}),))
    with pytest.raises(PlanMismatch, match="'nope'"):
        apply_plan(_fresh(0), missing)
    not_divisible = RewritePlan((PlanEntry("stem", "grouped", {"groups": 2}),))  # in_channels=3
    with pytest.raises(PlanMismatch, match=r"stem.*channels-not-divisible"):
        apply_plan(_fresh(0), not_divisible)
    unknown = RewritePlan((PlanEntry("mid", "no-such-pass", {}),))
    with pytest.raises(PlanMismatch, match="unknown pass"):
        apply_plan(_fresh(0), unknown)


def test_resnet18_safetensors_and_plan_round_trip(tmp_path) -> None:
    pytest.importorskip("safetensors")
    from fxrewrite.io.artifacts import save
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    # layer1 only: keeps the SVDs small; the rest of the network is saved and reloaded unchanged
    result = fxrewrite.rewrite(torchvision.models.resnet18(weights=None).eval(), (x,),
                               passes="depthwise-separable{rank=1}", select="layer1.*")
    saved = save(result, tmp_path / "model.safetensors")
    assert [p.name for p in saved.paths] == ["model.safetensors", "model.plan.json"]
    torch.manual_seed(1)
    fresh = torchvision.models.resnet18(weights=None)
    rebuilt = load_rewritten(fresh, tmp_path / "model.safetensors").eval()
    torch.testing.assert_close(rebuilt(x), result.module.eval()(x), rtol=0, atol=0)
    # the plan in the file's metadata is the same one
    (tmp_path / "model.plan.json").unlink()
    again = load_rewritten(fresh, tmp_path / "model.safetensors").eval()
    torch.testing.assert_close(again(x), result.module(x), rtol=0, atol=0)
    n_dw = sum(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in rebuilt.modules())
    assert n_dw == sum(r.status == "rewritten" for r in result.report.records)
