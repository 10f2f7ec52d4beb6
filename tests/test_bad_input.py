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


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def test_one_input_too_many_is_a_config_error() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"^Sequential.forward takes 1 input \(input\), got 2$"):
        fxrewrite.rewrite(_model(), (x, torch.randn(7, 7)), passes="grouped{groups=2}")
    with pytest.raises(ConfigError, match=r"takes 1 input \(input\), got 0"):
        fxrewrite.plan(_model(), (), passes="grouped{groups=2}")


def test_an_optional_forward_argument_may_be_given_or_not() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.conv(x) * scale

    x = torch.randn(1, 3, 8, 8)
    assert fxrewrite.rewrite(TwoInputs(), (x,), passes="grouped{groups=2}", verify=False).module is not None
    with pytest.raises(ConfigError, match=r"takes 1 to 2 inputs \(x, scale\), got 3"):
        fxrewrite.rewrite(TwoInputs(), (x, 1.0, 2.0), passes="grouped{groups=2}")


@pytest.mark.parametrize("options", [
    {"passes": "depthwise-separable{rank=1}"},
    {"target": fxrewrite.Target(macs=0.5)},
], ids=["repair", "calibrated-budget"])
def test_calibration_of_the_wrong_shape_is_a_config_error_before_any_fit(options: dict) -> None:
    x = torch.randn(1, 3, 16, 16)
    batches = [(torch.randn(4, 3, 16, 16),), (torch.randn(4, 1, 16, 16),)]
    with pytest.raises(ConfigError, match=r"^calibration batch 1, input 0 has shape \(4,1,16,16\); the model takes "
                                          r"\(N,3,H,W\) like its example input \(1,3,16,16\)$"):
        fxrewrite.rewrite(_model(), (x,), calibration=batches, **options)


def test_non_finite_calibration_data_is_named() -> None:
    bad = torch.randn(4, 3, 16, 16)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ConfigError, match=r"calibration batch 0, input 0 has 1 non-finite value"):
        fxrewrite.rewrite(_model(), (torch.randn(1, 3, 16, 16),), passes="depthwise-separable{rank=1}",
                          calibration=[(bad,)])
