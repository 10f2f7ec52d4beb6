"""fxrewrite.verify: shape equivalence with FakeTensors, numeric drift per site (local and accumulated) and at the
outputs, gates that name the failing site, and the integration into ``fxrewrite.rewrite``.

Expected figures are computed here independently, by running the modules by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError, VerificationFailure
from fxrewrite.graph.site_nodes import site_groups
from fxrewrite.verification.numerics import error_stats
from fxrewrite.verification.records import FLOAT_LEVEL
from fxrewrite.verification.verify import cli_exit_code


def _stats(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """rel L2, max abs, SQNR and cosine of a against b, straight from the definitions."""
    a, b = a.double().flatten(), b.double().flatten()
    err = torch.linalg.vector_norm(a - b)
    ref = torch.linalg.vector_norm(b)
    return {"rel_l2": float(err / ref), "max_abs": float((a - b).abs().max()),
            "sqnr_db": float(20 * torch.log10(ref / err)), "cosine": float(F.cosine_similarity(a, b, dim=0))}


def _assert_stats(stats: object, expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert getattr(stats, key) == pytest.approx(value, rel=1e-6, abs=1e-9), key


def _chain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def _rewrite(model: nn.Module, x: torch.Tensor, passes: str) -> torch.fx.GraphModule:
    return fxrewrite.rewrite(model, (x,), passes=passes, verify=False).module


def test_local_and_accumulated_figures_match_a_hand_computation(seeded: None) -> None:
    model = _chain()
    x = torch.randn(2, 4, 12, 12)
    new = _rewrite(model, x, "depthwise-separable{rank=1}")
    v = fxrewrite.verify(model, new, (x,), rtol=math.inf)
    assert v.ok and v.numerics_checked and v.level.startswith("no error gate")
    assert [s.site for s in v.sites] == ["0", "2"]
    with torch.no_grad():
        a = model[0](x)
        ref_out = model[2](torch.relu(a))
        new_a = new.get_submodule("0")(x)
        local2 = new.get_submodule("2")(torch.relu(a))  # the new subgraph on the original's input at site 2
        new_out = new(x)
    _assert_stats(v.site("0").local, _stats(new_a, a))
    _assert_stats(v.site("0").accumulated, _stats(new_a, a))
    _assert_stats(v.site("2").local, _stats(local2, ref_out))
    _assert_stats(v.site("2").accumulated, _stats(new_out, ref_out))
    _assert_stats(v.outputs[0].error, _stats(new_out, ref_out))
    # the two figures differ: site 2's accumulated error includes site 0's
    assert v.site("2").accumulated.rel_l2 > v.site("2").local.rel_l2 * 1.01
    assert v.site("2").local.numel == 2 * 8 * 12 * 12


def test_error_stats_of_identical_and_zero_tensors() -> None:
    t = torch.randn(5)
    same = error_stats(t, t)
    assert (same.rel_l2, same.max_abs, same.sqnr_db, same.cosine) == (0.0, 0.0, math.inf, pytest.approx(1.0))
    zero = error_stats(torch.zeros(3), torch.zeros(3))
    assert (zero.rel_l2, zero.cosine) == (0.0, 1.0)
    nan = error_stats(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    assert nan.nonfinite == 1 and nan.exceeds(rtol=math.inf, atol=math.inf)


def test_batches_accumulate_like_one_concatenated_batch(seeded: None) -> None:
    model = _chain()
    x1, x2 = torch.randn(1, 4, 10, 10), torch.randn(3, 4, 10, 10)
    new = _rewrite(model, x1, "depthwise-separable{rank=2}")
    split = fxrewrite.verify(model, new, (x1,), rtol=math.inf, batches=[(x1,), (x2,)])
    whole = fxrewrite.verify(model, new, (torch.cat([x1, x2]),), rtol=math.inf)
    assert split.batches == 2 and whole.batches == 1
    for a, b in [(split.site("2").local, whole.site("2").local), (split.outputs[0].error, whole.outputs[0].error)]:
        assert a.rel_l2 == pytest.approx(b.rel_l2, rel=1e-6)
        assert a.max_abs == pytest.approx(b.max_abs, rel=1e-6)
        assert a.cosine == pytest.approx(b.cosine, rel=1e-6)  # float32 convs differ slightly with the batch size
        assert a.numel == b.numel


def test_exact_rewrites_pass_at_float_level(seeded: None) -> None:
    model = models.Residual().eval()
    x = models.example_input(model)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    v = fxrewrite.verify(model, new, (x,))
    assert v.ok, v.failures
    assert (v.rtol, v.atol) == FLOAT_LEVEL[torch.float32]
    assert v.level.startswith("float level")
    rewritten = {s.site for s in v.sites}
    assert rewritten == {"stem", "body.0", "body.2", "grouped"}  # the 1x1 shortcut is not separable
    for s in v.sites:
        assert s.status == "ok" and s.shapes_ok
        assert s.output_before == s.output_after and s.input_before == s.input_after
        assert s.local.rel_l2 < 1e-5 and s.accumulated.rel_l2 < 1e-5
    assert v.outputs[0].after.shape == (2, 32, 16, 16) and v.outputs[0].error.cosine > 1 - 1e-9
    assert cli_exit_code(v) == 0 and v.exit_code == 0
    assert v.raise_if_failed() is v


class InPlaceBetweenReaders(nn.Module):
    """Two convs read one tensor, and an in-place ReLU changes it between them; an in-place add then changes the
    first conv's output after it was computed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        a = self.a(y)  # reads y before the ReLU
        torch.relu_(y)
        b = self.b(y)  # reads y after it
        a += b
        return a


def test_in_place_ops_do_not_reach_the_recorded_site_values(seeded: None) -> None:
    model = InPlaceBetweenReaders().eval()
    x = torch.randn(2, 4, 10, 10)
    x_before = x.clone()
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    v = fxrewrite.verify(model, new, (x,))
    assert v.ok, v.failures
    assert [s.site for s in v.sites] == ["a", "b"]
    assert all(s.local.rel_l2 < 1e-6 and s.accumulated.rel_l2 < 1e-6 for s in v.sites)
    with torch.no_grad():  # what each site is compared with: the conv on the input it read
        y = x * 2
        want_a = model.a(y)
        want_b = model.b(torch.relu(y))
        torch.testing.assert_close(new.a(y), want_a)
        torch.testing.assert_close(new.b(torch.relu(y)), want_b)
        torch.testing.assert_close(new(x), want_a + want_b)
    assert torch.equal(x, x_before)  # the example input itself is never modified


# ---------------------------------------------------------------------------------------- broken rewrites


def _drop_dilation(gm: torch.fx.GraphModule, site: str) -> None:
    gm.get_submodule(f"{site}.0").dilation = (1, 1)


def _drop_padding_mode(gm: torch.fx.GraphModule, site: str) -> None:
    gm.get_submodule(f"{site}.0").padding_mode = "zeros"


def _wrong_bias(gm: torch.fx.GraphModule, site: str) -> None:
    with torch.no_grad():
        gm.get_submodule(f"{site}.1").bias.add_(0.05)


def _transpose_pointwise(gm: torch.fx.GraphModule, site: str) -> None:
    conv = gm.get_submodule(f"{site}.1")
    conv.weight = nn.Parameter(conv.weight.detach().transpose(0, 1).contiguous())


def _nan_bias(gm: torch.fx.GraphModule, site: str) -> None:
    with torch.no_grad():
        gm.get_submodule(f"{site}.1").bias[0] = float("nan")


# (model, broken site, breakage, what the failure is about). 4 -> 36 channels, 3x3: the exact rank is 9 and the
# pointwise weight is 36 x 36, so its transpose still fits and only the numbers say it is wrong.
BROKEN: dict[str, tuple[Callable[[], nn.Module], str, Callable[[torch.fx.GraphModule, str], None], str]] = {
    "dilation dropped (shape)": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.ReLU(),
                                                       nn.Conv2d(8, 8, 3, padding=1)), "0", _drop_dilation,
                                 "output shape (2, 8, 12, 12) -> (2, 8, 14, 14)"),
    "dilation dropped (same padding)": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding="same", dilation=2),
                                                              nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), "0",
                                        _drop_dilation, "local relative L2 error"),
    "padding_mode dropped": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                                                   nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")), "2",
                             _drop_padding_mode, "local relative L2 error"),
    "wrong bias": (_chain, "2", _wrong_bias, "local relative L2 error"),
    "transposed pointwise weight": (lambda: nn.Sequential(nn.Conv2d(4, 36, 3, padding=1), nn.ReLU(),
                                                          nn.Conv2d(36, 8, 3, padding=1)), "0",
                                    _transpose_pointwise, "local relative L2 error"),
    "transposed pointwise weight (shape)": (lambda: nn.Sequential(nn.Conv2d(4, 36, 3, padding=1), nn.ReLU(),
                                                                  nn.Conv2d(36, 8, 3, padding=1)), "2",
                                            _transpose_pointwise, "fails shape propagation at node"),
    "non-finite output": (_chain, "2", _nan_bias, "non-finite value(s)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_rewrites_are_caught_and_the_site_is_named(seeded: None, case: str) -> None:
    build, site, breakage, about = BROKEN[case]
    model = build().eval()
    x = torch.randn(2, 4, 12, 12)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    assert fxrewrite.verify(model, new, (x,)).ok  # the correct rewrite passes at float level
    breakage(new, site)
    v = fxrewrite.verify(model, new, (x,))
    assert not v.ok and cli_exit_code(v) == 1
    named = [f for f in v.failures if f.startswith(f"site {site}: ")]
    assert named and about in named[0], v.failures
    assert v.site(site).status == "failed"
    with pytest.raises(VerificationFailure, match=f"site {site}: "):
        v.raise_if_failed()


def test_an_error_just_above_rtol_fails_and_just_below_passes(seeded: None) -> None:
    model = _chain()
    x = torch.randn(1, 4, 8, 8)
    new = _rewrite(model, x, "depthwise-separable{rank=1}")
    local = fxrewrite.verify(model, new, (x,), rtol=math.inf).site("0").local.rel_l2
    assert fxrewrite.verify(model, new, (x,), rtol=local * 1.001).site("0").status == "ok"
    low = fxrewrite.verify(model, new, (x,), rtol=local * 0.999)
    assert low.site("0").status == "failed" and any(f.startswith("site 0: local relative L2") for f in low.failures)
    assert low.level.startswith("approximate level")


def test_output_memory_format_and_structure_are_compared(seeded: None) -> None:
    model = _chain()
    x = torch.randn(1, 4, 8, 8)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}").to(memory_format=torch.channels_last)
    v = fxrewrite.verify(model, new, (x,))
    assert not v.ok
    assert v.outputs[0].before.memory_format == "contiguous" and v.outputs[0].after.memory_format == "channels_last"
    assert any("memory format contiguous -> channels_last" in f for f in v.failures)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        y = self.conv(x)
        return {"features": y, "logits": (self.head(y), 7)}


def test_nested_outputs_are_named_by_path(seeded: None) -> None:
    model = TwoHeads().eval()
    x = torch.randn(1, 3, 8, 8)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    v = fxrewrite.verify(model, new, (x,))
    assert v.ok, v.failures
    assert [o.name for o in v.outputs] == ["output['features']", "output['logits'][0]", "output['logits'][1]"]
    assert v.outputs[0].after.shape == (1, 6, 6, 6) and v.outputs[1].after.shape == (1, 2, 6, 6)
    assert v.outputs[2].before is None and v.outputs[2].status == "ok"  # the constant 7


def test_functional_sites_are_verified_by_node_name(seeded: None) -> None:
    model = models.FunctionalConv().eval()
    x = models.example_input(model)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    v = fxrewrite.verify(model, new, (x,))
    assert v.ok, v.failures
    assert [s.site for s in v.sites] == ["conv2d"]  # the 1x1 and the computed-weight convs are not rewritten
    assert v.sites[0].original_node == "conv2d" and v.sites[0].local.rel_l2 < 1e-5


class SharedShuffle(nn.Module):
    """A grouped conv feeding two dense convs: one shuffle is inserted and shared by both consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(8, 8, 1, groups=2)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.p(x))
        return self.a(y) + self.b(y)


def test_channel_shuffle_ops_belong_to_every_consumer_site(seeded: None) -> None:
    model = SharedShuffle().eval()
    x = torch.randn(1, 8, 6, 6)
    result = fxrewrite.rewrite(model, (x,), passes="channel-shuffle{rule=all, fold=false}")
    assert [(r.site, r.status) for r in result.report.records] == [("a", "rewritten"), ("b", "rewritten")]
    groups = site_groups(result.module, ["a", "b"])
    for site in ("a", "b"):  # the shared shuffle ops, then the compensated conv
        assert groups[site][-1].target == site and groups[site][0].args[0].target is torch.relu
    v = result.verification
    assert v.ok and v.level.startswith("float level"), v.failures
    assert [s.site for s in v.sites] == ["a", "b"]
    assert v.site("a").local.rel_l2 < 1e-6 and v.site("b").local.rel_l2 < 1e-6  # exact: weights compensate


def test_train_mode_and_batch_norm_statistics_are_untouched(seeded: None) -> None:
    model = models.Plain()  # train mode, with a BatchNorm
    x = models.example_input(model)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    new.train()
    stats = model.bn1.running_mean.clone()
    v = fxrewrite.verify(model, new, (x,))
    assert v.ok and v.mode == "eval", v.failures
    assert model.training and model.bn1.training and new.training
    torch.testing.assert_close(model.bn1.running_mean, stats, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- meta device


def test_meta_device_reports_shapes_and_costs_and_skips_numerics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2)).to("meta")
    x = torch.randn(1, 3, 32, 32, device="meta")
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=2, init=random}")
    v = result.verification
    assert v.ok and not v.numerics_checked
    assert "meta device" in v.numerics_reason and "numerics skipped" in str(result.report)
    assert [s.status for s in v.sites] == ["unchecked", "unchecked"]
    assert [s.output_after.shape for s in v.sites] == [(1, 16, 30, 30), (1, 32, 14, 14)]
    assert all(s.local is None and s.accumulated is None for s in v.sites)
    assert v.outputs[0].after.device == "meta" and v.outputs[0].error is None
    # costs from the formulas: site 0 = 16*30*30 outputs x 3*3*3; after, depthwise 6*30*30*9 + pointwise 16*30*30*6
    costs = result.report.costs
    assert costs.sites[0].macs_before == 16 * 30 * 30 * 27
    assert costs.sites[0].macs_after == 6 * 30 * 30 * 9 + 16 * 30 * 30 * 6
    assert costs.macs_before == 16 * 30 * 30 * 27 + 32 * 14 * 14 * 16 * 9
    assert costs.params_before == (16 * 27 + 16) + (32 * 144 + 32)


def test_meta_device_still_catches_a_shape_mismatch() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 4, 12, 12)
    new = _rewrite(model, x, "depthwise-separable{rank=exact}")
    _drop_dilation(new, "0")
    v = fxrewrite.verify(model.to("meta"), new.to("meta"), (x,))  # CPU inputs are checked as meta ones
    assert not v.ok and not v.numerics_checked
    assert v.failures[0].startswith("site 0: output shape (1, 8, 12, 12) -> (1, 8, 14, 14)")
    assert v.site("2").status == "unchecked" and "upstream" in v.site("2").reason


def test_numerics_false_and_fake_inputs_skip_numerics_with_a_reason(seeded: None) -> None:
    model = _chain()
    x = torch.randn(1, 4, 8, 8)
    new = _rewrite(model, x, "depthwise-separable{rank=1}")
    off = fxrewrite.verify(model, new, (x,), numerics=False)
    assert not off.numerics_checked and off.numerics_reason == "numerics=False was passed" and off.batches == 0
    from fxrewrite.graph.shapes import fake_mode
    fake = fake_mode().from_tensor(x)
    v = fxrewrite.verify(model, new, (fake,))
    assert not v.numerics_checked and "FakeTensors" in v.numerics_reason and v.ok


# ------------------------------------------------------------------------------------------ rewrite() wiring


def test_rewrite_attaches_the_verification_and_does_not_raise_on_a_failed_gate(seeded: None) -> None:
    model = _chain()
    x = torch.randn(1, 4, 8, 8)
    lossy = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}")
    assert lossy.ok and lossy.verification.level.startswith("no error gate")  # no rtol given: figures only
    assert lossy.report.verification is lossy.verification
    gated = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}", rtol=1e-3)
    assert gated.ok is False and gated.report.ok is False
    assert any(f.startswith("site 0: ") for f in gated.verification.failures)
    assert "verify: FAILED" in str(gated.report)
    with pytest.raises(VerificationFailure):
        gated.verification.raise_if_failed()
    exact = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}")
    assert exact.ok and exact.verification.level.startswith("float level")
    shapes_only = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}", verify="shapes")
    assert not shapes_only.verification.numerics_checked


def test_costs_without_verification_match_the_verified_ones(seeded: None) -> None:
    model = models.Residual().eval()
    x = models.example_input(model)
    passes = "grouped-separable{groups=2, rank=2}"
    verified = fxrewrite.rewrite(model, (x,), passes=passes).report.costs
    plain = fxrewrite.rewrite(model, (x,), passes=passes, verify=False)
    assert plain.verification is None and plain.report.costs == verified
    assert verified.macs_before == plain.report.context["model_macs_before"]
    # "grouped" has groups=4: skipped; the 1x1 "shortcut" is a grouped-separable site (a low-rank split saves MACs)
    assert [s.site for s in verified.sites] == ["stem", "body.0", "body.2", "shortcut"]


def test_bad_arguments_are_config_errors(seeded: None) -> None:
    model = _chain()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ConfigError, match=r"write \(x,\)"):
        fxrewrite.verify(model, model, x)
    with pytest.raises(ConfigError, match="rtol and atol must be >= 0"):
        fxrewrite.verify(model, model, (x,), rtol=-1)
    with pytest.raises(ConfigError, match="does not run on the example inputs"):
        fxrewrite.verify(model, model, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ConfigError, match="verify must be"):
        fxrewrite.rewrite(model, (x,), verify="yes")
