"""fxrewrite.demos.digits: a short run of the demonstration (trained CNN > 90% test accuracy; at 2x fewer conv MACs the
repaired model is at least as accurate as the data-free rewrite), and the option choice against fxrewrite's own
cost figures."""

from __future__ import annotations

import pytest
import torch

import fxrewrite
from fxrewrite.demos import digits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_short_demo_run() -> None:
    result = digits.run_demo(targets=(2.0,), epochs=5, calib_batches=4, distill_steps=3)
    assert result.acc_original > 90.0
    assert [r.form for r in result.rows] == list(digits.FORMS)
    for r in result.rows:
        assert r.ratio >= 2.0 and r.conv_macs_before / r.conv_macs_after == pytest.approx(r.ratio)
        assert r.acc_repaired >= r.acc_data_free, r
        assert r.output_error_repaired < r.output_error_data_free, r
        assert r.model_macs_before - r.model_macs_after == r.conv_macs_before - r.conv_macs_after
    text = str(result)
    assert "acc repaired+distill" in text and "2.00x" in text


@pytest.mark.parametrize("form", digits.FORMS)
@pytest.mark.parametrize("target", [2.0, 4.0])
def test_chosen_options_meet_the_target_by_fxrewrites_cost_model(form: str, target: float) -> None:
    torch.manual_seed(0)
    model = digits.DigitsCNN(width=8).eval()
    x = torch.randn(1, 1, 8, 8)
    shapes = digits.conv_shapes(model, x)
    assert sorted(shapes) == ["conv2", "conv3", "conv4"]
    choice = digits.choose_options(shapes, form, target)
    rules = [fxrewrite.Rule(site, options=opts) for site, opts in choice.options.items()]
    records = [r for r in fxrewrite.plan(model, (x,), passes=digits.pipeline(form), select=rules).records
               if r.status == "planned"]
    assert sorted(r.site for r in records) == sorted(shapes)
    assert sum(r.macs_before for r in records) == choice.macs_before
    assert sum(r.macs_after for r in records) == choice.macs_after
    assert choice.macs_after * target <= choice.macs_before
    # as close as the options allow: no site can take its next costlier option without missing the target
    for site, opts in choice.options.items():
        ladder = sorted(digits.candidate_options(shapes[site], form),
                        key=lambda o: digits.conv_macs(shapes[site], form, o))
        i = ladder.index(dict(opts))
        if i + 1 < len(ladder):
            bigger = choice.macs_after - digits.conv_macs(shapes[site], form, opts) + digits.conv_macs(
                shapes[site], form, ladder[i + 1])
            assert bigger * target > choice.macs_before


def test_the_permuted_grouped_form_keeps_more_weight_at_the_same_cost() -> None:
    result = digits.run_demo(forms=("grouped", "grouped-permuted"), targets=(2.0,), epochs=3, calib_batches=2,
                             distill_steps=0)
    natural, permuted = result.rows
    assert (permuted.form, permuted.options) == ("grouped-permuted", natural.options)
    assert (permuted.conv_macs_after, permuted.params_after) == (natural.conv_macs_after, natural.params_after)
    assert permuted.weight_rel_error <= natural.weight_rel_error  # the search never keeps less energy at a site
