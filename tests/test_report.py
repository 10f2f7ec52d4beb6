"""fxrewrite.report.report: the table layout (golden file), Markdown, and the JSON document against its schema.

The golden model has small-integer weights and inputs, so every convolution is exact in float32 whatever the BLAS
or summation order, and the pinned figures are the same on every machine. To regenerate the golden file after an
intended layout change: ``FXREWRITE_UPDATE_GOLDEN=1 pytest tests/test_report.py`` (then read the diff).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.report.report import SCHEMA_VERSION, CostComparison, Report, SiteRecord
from fxrewrite.report.schema import REPORT_SCHEMA, SchemaError, check_report, validate

GOLDEN = Path(__file__).parent / "golden" / "report_table.txt"


class Golden(nn.Module):
    """stem (3 input channels: not divisible by 2, skipped), mix (dense: grouped loses half its weight energy),
    head (already block-diagonal for 2 groups: grouped is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for conv in (self.stem, self.mix, self.head):
                conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape, generator=g).float())
                conv.bias.copy_(torch.randint(-2, 3, conv.bias.shape, generator=g).float())
            self.head.weight[:2, 4:] = 0
            self.head.weight[2:, :4] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(torch.relu(self.stem(x)))))


def _golden_result() -> fxrewrite.RewriteResult:
    x = torch.randint(-3, 4, (1, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float()
    return fxrewrite.rewrite(Golden().eval(), (x,), passes="grouped{groups=2}", rtol=0.1)


@pytest.fixture(scope="module")
def golden() -> fxrewrite.RewriteResult:
    return _golden_result()


def test_table_layout_matches_the_golden_file(golden: fxrewrite.RewriteResult) -> None:
    text = str(golden.report) + "\n"
    if os.environ.get("FXREWRITE_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_golden_figures_are_the_hand_computed_ones(golden: fxrewrite.RewriteResult) -> None:
    costs = golden.report.costs
    # MACs = outputs x (in_channels / groups) x kernel; params = weights + bias; all 8x8 outputs
    assert (costs.macs_before, costs.macs_after) == (8 * 64 * 27 + 8 * 64 * 72 + 4 * 64 * 8,
                                                    8 * 64 * 27 + 8 * 64 * 36 + 4 * 64 * 4)
    assert (costs.params_before, costs.params_after) == (224 + 584 + 36, 224 + (8 * 36 + 8) + (4 * 4 + 4))
    assert [(s.site, s.macs_before, s.macs_after) for s in costs.sites] == [("mix", 36864, 18432),
                                                                           ("head", 2048, 1024)]
    v = golden.verification
    assert not v.ok and [f.split(":")[0] for f in v.failures] == ["site mix", "output"]
    head = v.site("head")  # exact, so its local error is exactly zero on integer data
    assert (head.local.rel_l2, head.local.max_abs, head.local.cosine) == (0.0, 0.0, 1.0)


def test_markdown_has_every_section(golden: fxrewrite.RewriteResult) -> None:
    md = golden.report.to_markdown()
    for heading in ("## fxrewrite rewrite", "### Costs", "### Verification"):
        assert heading in md
    assert "| mix    | grouped | 584 -> 296 |" in md
    assert "- `site mix: local relative L2 error 0.678 > rtol 0.1" in md


def test_json_follows_the_schema_and_states_versions_units_inputs_and_passes(golden: fxrewrite.RewriteResult) -> None:
    doc = json.loads(golden.report.to_json())
    assert validate(doc) == []
    check_report(doc)
    assert (doc["schema"], doc["schema_version"]) == ("fxrewrite.report.report", SCHEMA_VERSION)
    assert doc["fxrewrite_version"] == fxrewrite.__version__ and doc["torch_version"] == torch.__version__
    assert doc["input_shapes"] == [[1, 3, 8, 8]] and doc["passes"] == ["grouped{groups=2, init=block}"]
    assert {"macs", "flops", "params", "rel_l2", "latency"} <= set(doc["units"])
    assert doc["verification"]["sites"][1]["local"]["sqnr_db"] == "inf"  # exact: non-finite written as a string
    assert doc["costs"]["sites"][0] == {"site": "mix", "params_before": 584, "params_after": 296,
                                        "macs_before": 36864, "macs_after": 18432}


def test_plan_and_meta_reports_follow_the_schema() -> None:
    model = Golden()
    x = torch.ones(1, 3, 8, 8)
    assert validate(fxrewrite.plan(model, (x,), passes="grouped{groups=2}").report.to_dict()) == []
    meta = fxrewrite.rewrite(copy.deepcopy(model).to("meta"), (x.to("meta"),),
                             passes="grouped{groups=2, init=random}")
    doc = meta.report.to_dict()
    assert validate(doc) == [] and doc["verification"]["numerics_checked"] is False
    assert validate(Report(()).to_dict()) == []


class Hidden(nn.Module):
    """conv -> block (a leaf module holding a conv): block.0 is not a site."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(x))


def test_convs_that_are_not_sites_are_in_every_rendering_and_the_rule_column_shows_the_winner() -> None:
    x = torch.ones(1, 4, 8, 8)
    plan = fxrewrite.plan(Hidden().eval(), (x,), passes="grouped{groups=2}", leaf_modules=["block"],
                          select=["conv"])
    report = plan.report
    assert [h.name for h in report.not_visible] == ["block.0"]
    text = str(report)
    assert ("\nnot visible (convolutions the graph does not call; never rewritten):\n  block.0: not-visible: "
            "inside 'block'") in text
    header, _, row = text.splitlines()[1:4]
    assert header.split() == ["site", "pass", "rule", "params", "MACs", "weight", "rel.", "error", "status"]
    assert row.split()[:3] == ["conv", "grouped", "conv"]  # the rule that selected the site
    assert "- `block.0: not-visible: inside 'block'" in report.to_markdown()
    doc = report.to_dict()
    assert validate(doc) == []
    assert doc["context"]["not_visible"] == [{"name": "block.0", "container": "block", "code": "not-visible",
                                              "reason": report.not_visible[0].reason.text}]
    listing = str(fxrewrite.plan(Hidden().eval(), (x,), leaf_modules=["block"]))  # no passes: the sites table
    assert listing.splitlines()[-2:] == report.not_visible_lines()
    assert "rule" not in str(fxrewrite.plan(Hidden().eval(), (x,), passes="grouped{groups=2}").report).split("\n")[1]


def test_the_validator_reports_every_mismatch_with_its_path(golden: fxrewrite.RewriteResult) -> None:
    doc = json.loads(golden.report.to_json())
    del doc["passes"]
    doc["schema_version"] = 99
    doc["records"][0]["status"] = "done"
    doc["verification"]["sites"][0]["local"]["rel_l2"] = "big"
    doc["costs"]["macs_after"] = -1
    doc["surprise"] = True
    errors = validate(doc)
    assert "$: missing required property 'passes'" in errors
    assert "$: unexpected property 'surprise'" in errors
    assert "$.schema_version: expected 1, got 99" in errors
    assert any(e.startswith("$.records[0].status: expected one of") for e in errors)
    assert any(e.startswith("$.verification.sites[0].local.rel_l2: matches no allowed form") for e in errors)
    assert "$.costs.macs_after: -1 is below the minimum 0" in errors
    assert len(errors) == 6
    with pytest.raises(SchemaError, match="schema_version"):
        check_report(doc)
    assert validate(True, {"type": "integer"}) == ["$: expected integer, got boolean True"]
    assert validate(float("nan"), {"type": "number"}) == ["$: expected number, got float nan"]  # strict JSON
    assert REPORT_SCHEMA["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_records_and_reports_are_immutable(golden: fxrewrite.RewriteResult) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        golden.report.title = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        golden.verification.ok = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        SiteRecord("s", "p", "skipped").details["k"] = 1  # type: ignore[index]
    assert isinstance(golden.report.costs, CostComparison)
