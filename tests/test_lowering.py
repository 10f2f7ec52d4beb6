"""The depthwise multiplier lowerings (``lowering=direct|tile|repeat`` of the separable passes): same numbers as the
direct grouped conv, same preserved conv attributes, exportable, and counted at the right MACs."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxrewrite
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.measure.cost import model_cost
from fxrewrite.passes import DepthwiseSeparable, GroupedSeparable
from fxrewrite.passes.separable import ChannelRepeat

CONFIGS = {
    "plain": dict(kernel_size=3, padding=1),
    "stride2-bias": dict(kernel_size=3, stride=2, padding=1, bias=True),
    "same-dilated": dict(kernel_size=3, padding="same", dilation=2),
    "reflect-5x3": dict(kernel_size=(5, 3), padding=(2, 1), padding_mode="reflect", bias=True),
    "valid-circular": dict(kernel_size=3, padding=1, padding_mode="circular", stride=(2, 1)),
}


def _model(config: str, dtype: torch.dtype = torch.float32, groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 12, groups=groups, **CONFIGS[config]), nn.ReLU()).to(dtype).eval()


def _rewrite(model: nn.Module, x: torch.Tensor, p: fxrewrite.passes.Pass) -> fxrewrite.frontends.api.RewriteResult:
    return fxrewrite.rewrite(model, (x,), passes=[p], verify=False)


def _flop_macs(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fcm:
        module(x)
    return fcm.get_total_flops() // 2


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("lowering", ["tile", "repeat"])
@pytest.mark.parametrize("rank", [2, 3])
def test_lowering_matches_direct(config: str, lowering: str, rank: int) -> None:
    model = _model(config, torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    direct = _rewrite(model, x, DepthwiseSeparable(rank=rank))
    lowered = _rewrite(model, x, DepthwiseSeparable(rank=rank, lowering=lowering))
    torch.testing.assert_close(lowered.module(x), direct.module(x), rtol=1e-10, atol=1e-10)
    seq = lowered.module.get_submodule("0")
    repeat, depthwise, pointwise = seq
    orig = model[0]
    assert isinstance(repeat, ChannelRepeat)
    assert (repeat.multiplier, repeat.interleave) == (rank, lowering == "repeat")
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.groups) == (8 * rank, 8 * rank, 8 * rank)
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(depthwise, attr) == getattr(orig, attr)
    assert depthwise.bias is None and (pointwise.bias is not None) == (orig.bias is not None)
    assert depthwise.weight.dtype == pointwise.weight.dtype == torch.float64
    assert lowered.report.records[0].details["lowering"] == lowering
    assert isinstance(model[0], nn.Conv2d)  # the input model is untouched
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_exact_rank_tile_reproduces_the_original() -> None:
    model = _model("stride2-bias")
    x = torch.randn(1, 8, 9, 9)
    result = _rewrite(model, x, DepthwiseSeparable(rank="exact", lowering="tile"))
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)
    assert result.report.records[0].details == {"rank": 9, "exact_rank": 9, "groups": 8, "lowering": "tile"}


@pytest.mark.parametrize(("p", "expected"), [
    (DepthwiseSeparable(rank=1, lowering="tile"), "direct"),  # multiplier 1 is already a plain depthwise conv
    (GroupedSeparable(groups=4, rank=2, lowering="tile"), "direct"),  # not depthwise: 2 inputs per group
    (GroupedSeparable(groups=8, rank=2, lowering="tile"), "tile"),  # groups == in_channels: depthwise
])
def test_lowering_applies_only_to_depthwise_multipliers(p: fxrewrite.passes.Pass, expected: str) -> None:
    model = _model("plain")
    x = torch.randn(1, 8, 7, 7)
    direct = _rewrite(model, x, type(p)(**{**p.options(), "lowering": "direct"}))
    result = _rewrite(model, x, p)
    assert result.report.records[0].details["lowering"] == expected
    n_children = 3 if expected != "direct" else 2
    assert len(result.module.get_submodule("0")) == n_children
    torch.testing.assert_close(result.module(x), direct.module(x), rtol=1e-5, atol=1e-5)


def test_grouped_source_conv_uses_repeat_for_tile() -> None:
    """A grouped source keeps its groups in the 1x1 conv; tiling would scatter a group's channels, so tile -> repeat."""
    model = _model("plain", groups=2)
    x = torch.randn(1, 8, 7, 7)
    direct = _rewrite(model, x, DepthwiseSeparable(rank=2))
    result = _rewrite(model, x, DepthwiseSeparable(rank=2, lowering="tile"))
    assert result.report.records[0].details["lowering"] == "repeat"
    assert result.module.get_submodule("0.2").groups == 2
    torch.testing.assert_close(result.module(x), direct.module(x), rtol=1e-5, atol=1e-5)


def test_random_init_tile_builds_the_same_structure() -> None:
    model = _model("plain")
    x = torch.randn(1, 8, 7, 7)
    result = _rewrite(model, x, DepthwiseSeparable(rank=2, init="random", lowering="tile"))
    assert [type(m).__name__ for m in result.module.get_submodule("0")] == ["ChannelRepeat", "Conv2d", "Conv2d"]
    assert result.module(x).shape == model(x).shape


def test_unknown_lowering_is_an_error_naming_the_choices() -> None:
    with pytest.raises(fxrewrite.errors.ConfigError, match=r"lowering must be one of \('direct', 'tile', 'repeat'\)"):
        DepthwiseSeparable(rank=2, lowering="fast")


def test_pipeline_string_parses_lowering() -> None:
    (p,) = fxrewrite.passes.parse_pipeline("depthwise-separable{rank=2, lowering=tile}")
    assert p == DepthwiseSeparable(rank=2, lowering="tile")


@pytest.mark.parametrize("lowering", ["direct", "tile", "repeat"])
def test_macs_equal_flop_counter(lowering: str) -> None:
    """The report's per-site MACs and the cost model both equal FlopCounterMode / 2 (the repeat counts 0)."""
    model = _model("stride2-bias")
    x = torch.randn(2, 8, 12, 12)
    result = _rewrite(model, x, DepthwiseSeparable(rank=3, lowering=lowering))
    expected = _flop_macs(result.module, x)
    assert expected == 2 * 8 * 3 * 6 * 6 * 9 + 2 * 12 * 8 * 3 * 6 * 6  # depthwise kxk + 1x1, at the 6x6 output
    assert result.report.totals()["macs_after"] == expected
    gm = trace(result.module)
    propagate_shapes(gm, (x,))
    assert model_cost(gm).macs == expected


@pytest.mark.parametrize("lowering", ["tile", "repeat"])
def test_torch_export_round_trip(lowering: str) -> None:
    model = _model("reflect-5x3")
    x = torch.randn(2, 8, 9, 9)
    result = _rewrite(model, x, DepthwiseSeparable(rank=2, lowering=lowering))
    buf = io.BytesIO()
    torch.export.save(torch.export.export(result.module, (x,)), buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    torch.testing.assert_close(loaded(x), result.module(x))


@pytest.mark.parametrize("lowering", ["tile", "repeat"])
def test_onnx_round_trip(lowering: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _model("stride2-bias")
    x = torch.randn(2, 8, 9, 9)
    result = _rewrite(model, x, DepthwiseSeparable(rank=2, lowering=lowering))
    buf = io.BytesIO()
    torch.onnx.export(result.module, (x,), buf, dynamo=False, input_names=["x"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), result.module(x), rtol=1e-5, atol=1e-5)
