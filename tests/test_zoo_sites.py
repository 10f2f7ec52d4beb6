"""Every torchvision classification model: tracing succeeds and the convolution sites fxrewrite finds are exactly
the ``nn.Conv2d`` calls that forward makes, counted independently with forward hooks.

No real compute: models are built on the meta device, shapes are propagated from meta inputs, and the hooked
forward runs on meta tensors too.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams

import fxrewrite
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import find_sites

pytestmark = pytest.mark.slow

NAMES = torchvision.models.list_models(module=torchvision.models)


def input_size(name: str) -> int:
    """The smallest convenient input: ViT, Swin and MaxViT need 224; inception_v3 needs at least 75."""
    if name.startswith(("vit_", "swin", "maxvit")):
        return 224
    return 96 if name == "inception_v3" else 64


def build_on_meta(name: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """The model with random (meta) weights. RegNet computes its block widths with tensors and reads them back
    (``.tolist()``), which meta tensors cannot do, so that one helper runs on the CPU."""
    original = BlockParams.from_init_params

    def widths_on_cpu(*args: object, **kwargs: object) -> BlockParams:
        with torch.device("cpu"):
            return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(BlockParams, "from_init_params", staticmethod(widths_on_cpu))
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval()


def conv_calls(model: nn.Module, x: torch.Tensor) -> Counter[tuple[str, tuple[int, ...]]]:
    """(qualified name, output shape) of every nn.Conv2d call in one forward, counted by forward hooks."""
    calls: Counter[tuple[str, tuple[int, ...]]] = Counter()
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: calls.update([(n, tuple(out.shape))]))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_there_are_80_classification_models() -> None:
    assert len(NAMES) == 80


@pytest.mark.parametrize("name", NAMES)
def test_sites_equal_the_conv2d_calls_forward_makes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_on_meta(name, monkeypatch)
    x = torch.empty(1, 3, input_size(name), input_size(name), device="meta")
    gm = trace(model)
    propagate_shapes(gm, (x,))
    sites = find_sites(gm)
    found = Counter((s.name, s.output_shape) for s in sites)
    expected = conv_calls(model, x)
    assert found == expected
    assert sum(expected.values()) > 0
    assert all(s.kind == "module" and s.input_shape is not None for s in sites)


def test_resnet18_plan() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    plan = fxrewrite.plan(model, (torch.randn(1, 3, 64, 64),))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [s.name for s in plan.sites] == convs and len(convs) == 20
    by_name = {s.name: s for s in plan.sites}
    assert by_name["conv1"].reason_for("grouped").code == "channels-not-divisible"  # 3 input channels
    for name in ("layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"):
        assert by_name[name].reason_for("depthwise-separable").code == "pointwise-kernel"
        assert by_name[name].reason_for("grouped") is None
    assert all(s.reason_for("depthwise-separable") is None for s in plan.sites if s.spec.kernel_size != (1, 1))
    assert "20 convolution site(s)" in str(plan)
