"""User mistakes and bad data get a ConfigError (CLI exit 2) with one true sentence, before any expensive work; the
input model is never changed and nothing is written (issue 17)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError


def _nan_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight[1, 2, 0, 1] = float("nan")
    return model


@pytest.mark.parametrize("options", [
    {"passes": "grouped{groups=2}"},
    {"passes": "depthwise-separable"},
    {"passes": "depthwise-bottleneck{rank=2}"},
    {"target": fxrewrite.Target(macs=0.5)},
], ids=["grouped", "depthwise-separable", "bottleneck", "target"])
def test_a_nan_weight_is_a_config_error_naming_the_site_and_count(options: dict) -> None:
    model = _nan_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"site '2': weight has 1 non-finite value \(NaN or inf\) of 576"):
        fxrewrite.rewrite(model, (torch.randn(1, 3, 8, 8),), **options)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_a_nan_weight_outside_the_selection_is_not_an_error() -> None:
    result = fxrewrite.rewrite(_nan_model(), (torch.randn(1, 3, 8, 8),), passes="depthwise-separable{rank=exact}",
                               select="0")
    assert [r.status for r in result.report.records if r.site == "0"] == ["rewritten"]


def test_the_site_listing_of_a_nan_model_still_works() -> None:
    """A dry run without passes only lists sites: nothing is factorised, so a NaN weight is no reason to refuse."""
    plan = fxrewrite.plan(_nan_model(), (torch.randn(1, 3, 8, 8),))
    assert [s.name for s in plan.sites] == ["0", "2"]
