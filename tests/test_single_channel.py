"""Convs with one input channel (an audio stem ``Conv2d(1, C, (K, 1), stride=(4, 1))``) are candidates by their cost:
a rank-r split of the C x K filter bank costs r*(K + C) per position instead of K*C (issue 14, item 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.budget.choose import choose_plan
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import REWRITE_KINDS, find_sites
from fxrewrite.measure.cost import model_cost
from fxrewrite.passes import DepthwiseBottleneck, DepthwiseSeparable, GroupedBottleneck, GroupedSeparable
from fxrewrite.passes.bottleneck import structural_reason


def _stem(channels: int = 24, taps: int = 48) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, channels, (taps, 1), stride=(4, 1), padding=(taps // 2, 0)), nn.ReLU(),
                         nn.Conv2d(channels, 8, (5, 1), padding=(2, 0)))


def _hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Conv MACs counted at run time: output elements x in_channels / groups x kh x kw."""
    total = 0

    def hook(m: nn.Module, args: object, y: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        total += y.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def test_a_stem_is_a_candidate_for_every_separable_and_bottleneck_form() -> None:
    gm = trace(_stem())
    propagate_shapes(gm, (torch.randn(2, 1, 256, 1),))
    stem = find_sites(gm)[0]
    reasons = {k: stem.reason_for(k) for k in REWRITE_KINDS}
    assert reasons["depthwise-separable"] is None and reasons["grouped-separable"] is None
    assert reasons["grouped"] is not None and reasons["grouped"].code == "channels-not-divisible"  # no g > 1 divides 1
    assert structural_reason(stem) is None
    # a one-channel conv where no split saves: 2 taps, 2 outputs (rank 1 costs 2 + 2, no fewer than 2 x 2)
    tiny = trace(nn.Conv2d(1, 2, (2, 1)))
    propagate_shapes(tiny, (torch.randn(1, 1, 8, 1),))
    site = find_sites(tiny)[0]
    assert site.reason_for("depthwise-separable").code == "no-saving"
    assert "no fewer than" in site.reason_for("depthwise-separable").text
    assert structural_reason(site).code == "no-saving"


@pytest.mark.parametrize("form", [DepthwiseSeparable(rank="exact"), GroupedSeparable(groups=1, rank="exact"),
                                  GroupedBottleneck(groups=1, rank="exact"), DepthwiseBottleneck(rank="exact")],
                         ids=lambda p: p.name)
def test_a_full_rank_split_of_a_strided_stem_is_exact(form: fxrewrite.passes.ConvRewritePass) -> None:
    torch.manual_seed(0)
    model = _stem().double().eval()
    x = torch.randn(3, 1, 256, 1, dtype=torch.float64)
    result = fxrewrite.rewrite(model, (x,), passes=[form], select=["0"], verify=False)
    (rec,) = [r for r in result.report.records if r.site == "0"]
    assert rec.status == "rewritten" and rec.exact
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_the_stem_split_costs_what_an_independent_count_says(rank: int) -> None:
    torch.manual_seed(0)
    c, k, h, n = 64, 128, 1024, 2
    model = nn.Sequential(nn.Conv2d(1, c, (k, 1), stride=(4, 1), padding=(k // 2, 0))).eval()
    x = torch.randn(n, 1, h, 1)
    out_len = (h + 2 * (k // 2) - k) // 4 + 1
    assert _hook_macs(model, x) == n * out_len * k * c
    result = fxrewrite.rewrite(model, (x,), passes=[DepthwiseSeparable(rank=rank)], verify=False)
    # a rank-r split: the k x 1 conv 1 -> r at stride 4, then a 1x1 conv r -> c, both at the output length
    expected = n * out_len * rank * (k + c)
    assert _hook_macs(result.module, x) == expected == model_cost(result.module).macs
    (rec,) = result.report.records
    assert rec.macs_after == expected and rec.macs_before == n * out_len * k * c


def _low_rank_stem_model() -> tuple[nn.Module, torch.Tensor]:
    """A stem holding most of the MACs with a rank-4 filter bank (plus a little noise), then a small conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 64, (256, 1), stride=(4, 1), padding=(128, 0)), nn.ReLU(),
                          nn.Conv2d(64, 16, (9, 1), padding=(4, 0)), nn.ReLU(), nn.Conv2d(16, 16, 1)).eval()
    with torch.no_grad():
        w = torch.randn(64, 4) @ torch.randn(4, 256) + 1e-3 * torch.randn(64, 256)
        model[0].weight.copy_(w.view(64, 1, 256, 1))
    return model, torch.randn(2, 1, 1024, 1)


def test_a_budget_chooses_the_stem_and_reports_every_site() -> None:
    model, x = _low_rank_stem_model()
    gm = trace(model)
    propagate_shapes(gm, (x,))
    stem_macs = find_sites(gm)[0].macs
    assert stem_macs > 0.4 * model_cost(gm).macs
    plan = choose_plan(gm, fxrewrite.Target(macs=0.5))
    chosen = {c.site: c for c in plan.changed}
    assert "0" in chosen and chosen["0"].predicted_rel_error < 0.01
    result = fxrewrite.rewrite(model, (x,), target=fxrewrite.Target(macs=0.5), verify=False)
    records = {r.site: r for r in result.report.records}
    assert set(records) == {"0", "2", "4"}  # every site, rewritten or not
    assert records["0"].status == "rewritten"
    assert all(r.status == "rewritten" or (r.code and r.reason) for r in records.values())
    assert _hook_macs(result.module, x) <= 0.5 * _hook_macs(model, x)
    # a hard target is reachable now that the stem can be cut
    deep = choose_plan(gm, fxrewrite.Target(macs=0.1))
    assert deep.macs_after <= 0.1 * deep.macs_before


def test_a_calibrated_budget_cuts_the_stem() -> None:
    model, x = _low_rank_stem_model()
    batches = [(torch.randn(4, 1, 1024, 1),) for _ in range(2)]
    result = fxrewrite.rewrite(model, (x,), target=fxrewrite.Target(macs=0.5), calibration=batches, verify=False)
    records = {r.site: r for r in result.report.records}
    assert records["0"].status == "rewritten" and set(records) == {"0", "2", "4"}
    assert _hook_macs(result.module, x) <= 0.5 * _hook_macs(model, x)
