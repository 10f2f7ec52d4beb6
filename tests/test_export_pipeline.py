"""The export pipeline: fxrewrite passes inside torch's PassManager, and rewrite -> .pt2 / ONNX -> same outputs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.passes.infra.pass_base import PassResult as TorchPassResult
from torch.fx.passes.infra.pass_manager import PassManager as TorchPassManager

import fxrewrite
from fxrewrite.frontends.exported import rewrite_exported
from fxrewrite.graph.capture import trace
from fxrewrite.io.artifacts import onnxruntime_outputs, save
from fxrewrite.passes import DepthwiseSeparable

#: ONNX (onnxruntime, CPU) vs eager PyTorch, float32: the largest |difference| accepted on these models' outputs
ONNX_ATOL = 1e-4


def dead_code_pass(gm: torch.fx.GraphModule) -> TorchPassResult:
    """Another pass of the pipeline: torch.fx dead-code elimination."""
    modified = gm.graph.eliminate_dead_code()
    gm.recompile()
    return TorchPassResult(gm, modified)


class WithDeadCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unused = torch.sigmoid(x) * 2  # noqa: F841 - dead code the other pass removes
        return self.b(torch.relu(self.a(x)))


def test_fxrewrite_pass_inside_torch_pass_manager() -> None:
    torch.manual_seed(0)
    model, x = WithDeadCode().eval(), torch.randn(2, 4, 9, 9)
    gm = trace(model)
    assert sum(n.op == "call_function" for n in gm.graph.nodes) == 3  # sigmoid, mul, relu
    manager = TorchPassManager([DepthwiseSeparable(rank="exact"), dead_code_pass], run_checks_after_each_pass=True)
    result = manager(gm)
    out = result.graph_module
    assert result.modified
    assert [n.target for n in out.graph.nodes if n.op == "call_function"] == [torch.relu]
    convs = {name: (m.in_channels, m.out_channels, m.groups) for name, m in out.named_modules()
             if isinstance(m, nn.Conv2d)}
    # exact rank: min(O, K) = 8 per input channel for a (4 -> 8, but K=9) and b (8 -> 8)
    assert convs == {"a.0": (4, 32, 4), "a.1": (32, 8, 1), "b.0": (8, 64, 8), "b.1": (64, 8, 1)}
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    provenance = {n.meta["fxrewrite"]["site"] for n in out.graph.nodes if "fxrewrite" in n.meta}
    assert provenance == {"a", "b"}


@pytest.fixture(scope="module")
def resnet_rewritten() -> tuple[fxrewrite.RewriteResult, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    model = torchvision.models.resnet18(weights=None).eval()
    # depthwise-separable on layer1 (small SVDs), so the graph holds depthwise, pointwise and plain convolutions
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}", select="layer1.*", verify=False)
    assert sum(r.status == "rewritten" for r in result.report.records) == 4
    return result, x


def test_resnet18_pt2_round_trip(resnet_rewritten, tmp_path: Path) -> None:
    result, x = resnet_rewritten
    saved = save(result, tmp_path / "resnet18.pt2", (x,))
    loaded = torch.export.load(tmp_path / "resnet18.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), result.module(x), rtol=0, atol=0)
    assert saved.max_abs_diff == 0.0
    state = result.module.state_dict()
    assert sorted(loaded.state_dict) == sorted(state)


def _onnx_conv_groups(path: Path) -> Counter[int]:
    import onnx
    graph = onnx.load(str(path)).graph  # loads the external-data file beside it too
    return Counter(next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node if n.op_type == "Conv")


def _module_conv_groups(module: nn.Module) -> Counter[int]:
    return Counter(m.groups for m in module.modules() if isinstance(m, nn.Conv2d))


def test_resnet18_onnx_round_trip(resnet_rewritten, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result, x = resnet_rewritten
    saved = save(result, tmp_path / "resnet18.onnx", (x,), atol=ONNX_ATOL, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in saved.paths)
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= ONNX_ATOL
    (got,) = onnxruntime_outputs(tmp_path / "resnet18.onnx", (x,))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), result.module(x), rtol=0, atol=ONNX_ATOL)
    groups = _onnx_conv_groups(tmp_path / "resnet18.onnx")
    assert groups == _module_conv_groups(result.module)
    assert groups[64] == 4  # the four depthwise convolutions of layer1 (64 channels, multiplier 1)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.bn(self.stem(x)))))).mean((2, 3))


def test_exported_program_to_onnx_keeps_the_groups(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = Small().eval()
    ep = torch.export.export(model, (x,))
    result = rewrite_exported(ep, (x,), "depthwise-separable{rank=2},grouped{groups=4}", verify=False)
    saved = save(result, tmp_path / "small.onnx", (x,), atol=ONNX_ATOL, rtol=0)
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= ONNX_ATOL
    groups = _onnx_conv_groups(tmp_path / "small.onnx")
    aten_groups = Counter(int(n.args[6]) if len(n.args) > 6 else 1 for n in result.module.graph.nodes
                          if n.target is torch.ops.aten.conv2d.default)
    # stem: depthwise 3 -> 6 (groups=3) + 1x1 6 -> 16 (6 is not divisible by 4: stays dense);
    # body: depthwise 16 -> 32 (groups=16) + 1x1 32 -> 32 grouped 4; head (1x1, skipped by dw-sep) grouped 4
    assert groups == aten_groups == Counter({3: 1, 1: 1, 16: 1, 4: 2})
    rewritten = [(r.site, r.pass_name) for r in result.report.records if r.status == "rewritten"]
    assert rewritten == [("stem", "depthwise-separable"), ("body", "depthwise-separable"), ("body.1", "grouped"),
                         ("head", "grouped")]
