"""What a rewrite must preserve: conv hyper-parameters, bias placement, dtype, device, memory format, requires_grad,
train/eval flags, qualified names and state_dict keys (artifacts load without fxrewrite), readable code, and the
untouched input model."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxrewrite

pytestmark = pytest.mark.usefixtures("one_thread")

SEPARABLE = ("depthwise-separable{rank=2}", "grouped-separable{groups=2, rank=2}")
ALL_PASSES = (*SEPARABLE, "grouped{groups=2}")



def _rewrite(model: nn.Module, x: torch.Tensor, passes: str) -> fxrewrite.RewriteResult:
    result = fxrewrite.rewrite(model, (x,), passes=passes, verify=False)
    assert all(r.status == "rewritten" for r in result.report.records), result.report
    return result


def _new_convs(result: fxrewrite.RewriteResult, name: str) -> tuple[nn.Conv2d, nn.Conv2d | None]:
    """(spatial conv, pointwise conv or None) that replaced the conv at ``name``."""
    new = result.module.get_submodule(name)
    if isinstance(new, nn.Sequential):
        assert type(new) is nn.Sequential and len(new) == 2
        return new[0], new[1]
    assert type(new) is nn.Conv2d
    return new, None


HYPER = [  # (kernel, stride, padding, dilation, padding_mode)
    ((3, 3), 1, 1, 1, "zeros"), ((3, 1), 2, (1, 0), 1, "reflect"), ((1, 5), (1, 2), (0, 2), 1, "replicate"),
    ((2, 2), 1, "same", 2, "circular"), ((3, 3), 1, "same", (2, 1), "reflect"), ((4, 2), 1, "same", 1, "zeros"),
    ((5, 3), 1, "valid", (1, 2), "zeros"), ((3, 3), (2, 1), 2, 2, "circular"), ((2, 4), 1, "same", 3, "replicate"),
]


@pytest.mark.parametrize("hyper", HYPER, ids=str)
@pytest.mark.parametrize("passes", ALL_PASSES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_hyper_parameters_and_bias(hyper: tuple, passes: str, bias: bool) -> None:
    kernel, stride, padding, dilation, mode = hyper
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel, stride, padding, dilation, bias=bias, padding_mode=mode)
    x = torch.randn(1, 4, 11, 12)
    result = _rewrite(nn.Sequential(conv), x, passes)
    spatial, pointwise = _new_convs(result, "0")
    for attr in ("kernel_size", "stride", "padding", "dilation", "padding_mode", "in_channels"):
        assert getattr(spatial, attr) == getattr(conv, attr), attr
    last = pointwise if pointwise is not None else spatial
    assert last.out_channels == conv.out_channels
    assert (last.bias is not None) is bias
    if bias:
        torch.testing.assert_close(last.bias, conv.bias, rtol=0, atol=0)
    if pointwise is not None:
        assert spatial.bias is None
        assert (pointwise.kernel_size, pointwise.stride, pointwise.padding, pointwise.dilation,
                pointwise.padding_mode) == ((1, 1), (1, 1), (0, 0), (1, 1), "zeros")
    assert result.module(x).shape == conv(x).shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("passes", ["depthwise-separable{rank=exact}", "grouped-separable{groups=2, rank=exact}"])
def test_dtype(dtype: torch.dtype, passes: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    x = torch.randn(2, 4, 7, 9).to(dtype)
    result = _rewrite(nn.Sequential(conv), x, passes)
    assert {p.dtype for p in result.module.parameters()} == {dtype}
    y, ref = result.module(x), conv(x)
    assert y.dtype == dtype
    # exact factors rounded to the dtype: the output error is a few units of the dtype's rounding
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), ref.double(), rtol=0, atol=64 * eps * float(ref.detach().abs().max()))


def _devices() -> list[str]:
    return ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_device(device: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, device=device)
    x = torch.randn(2, 4, 7, 9, device=device)
    # weights on the meta device have no values to factorise: only a fresh init can be built there
    passes = ("depthwise-separable{rank=exact, init=random}" if device == "meta"
              else "depthwise-separable{rank=exact}")
    result = _rewrite(nn.Sequential(conv), x, passes)
    assert {p.device.type for p in result.module.parameters()} == {device}
    y = result.module(x)
    assert y.device.type == device and y.shape == conv(x).shape
    if device != "meta":
        torch.testing.assert_close(y, conv(x))
    else:  # the factorisation needs values: a clear skip, not a crash
        skipped = fxrewrite.rewrite(nn.Sequential(conv), (x,), passes="depthwise-separable{rank=1}", verify=False)
        assert [(r.status, r.code) for r in skipped.report.records] == [("skipped", "meta-weight")]


@pytest.mark.parametrize("passes", ["grouped{groups=2}", "grouped-separable{groups=2, rank=3}",
                                    "depthwise-separable{rank=2}"])
def test_channels_last_weights(passes: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3)).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    result = _rewrite(model, torch.randn(1, 4, 7, 7), passes)
    for p in result.module.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    spatial, _ = _new_convs(result, "0")
    if spatial.weight.shape[1] > 1:  # the layouts differ only when a filter has several input channels
        assert not spatial.weight.is_contiguous()
    # and a contiguous original gives contiguous weights
    plain = _rewrite(nn.Sequential(nn.Conv2d(4, 8, 3)), torch.randn(1, 4, 7, 7), passes)
    assert all(p.is_contiguous() for p in plain.module.parameters())


@pytest.mark.parametrize("passes", ALL_PASSES)
def test_requires_grad_and_training_flags(passes: str) -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    model[0].weight.requires_grad_(False)  # frozen weight, trainable bias
    model.train()
    model[2].eval()  # a conv in eval mode inside a model in train mode
    result = _rewrite(model, torch.randn(1, 4, 9, 9), passes)
    assert result.module.training is True
    for name, frozen_weight, training in (("0", True, True), ("2", False, False)):
        new = result.module.get_submodule(name)
        assert new.training is training
        assert all(m.training is training for m in new.modules())
        convs = [m for m in new.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.weight.requires_grad is not frozen_weight for c in convs)
        assert convs[-1].bias.requires_grad is True
    result.module.eval()
    assert not any(m.training for m in result.module.modules())


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(torch.relu(self.bn1(self.conv1(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Block(), Block())
        self.head = nn.Conv2d(8, 4, 1, groups=2)
        self.tail = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.head(self.layer1(self.stem(x)))))


def _plain_equivalent(model: nn.Module, result: fxrewrite.RewriteResult) -> nn.Module:
    """``model`` with each rewritten conv replaced by plain modules of the new shapes, built without fxrewrite."""
    plain = copy.deepcopy(model)
    for name, new in result.module.named_modules():
        if name and isinstance(new, nn.Sequential) and all(type(c) is nn.Conv2d for c in new):
            convs = [nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                               c.groups, c.bias is not None, c.padding_mode) for c in new]
            parent, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(parent) if parent else plain, leaf, nn.Sequential(*convs))
    return plain


def test_qualified_names_state_dict_and_plain_loading() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}", verify=False)
    keys = set(result.module.state_dict())
    assert {"layer1.0.conv1.0.weight", "layer1.0.conv1.1.weight", "layer1.0.conv2.1.bias", "stem.1.bias",
            "layer1.0.bn1.running_mean", "head.weight", "tail.weight"} <= keys
    assert "layer1.0.conv1.1.bias" not in keys and "layer1.0.conv1.weight" not in keys
    # the same keys load strictly into the original model class with plain Sequential(Conv2d, Conv2d) at the sites
    plain = _plain_equivalent(model, result).eval()
    buffer = io.BytesIO()
    torch.save(result.module.state_dict(), buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    torch.testing.assert_close(plain(x), result.module(x), rtol=0, atol=0)
    torch.testing.assert_close(result.module(x), model(x))


def test_saved_module_loads_without_fxrewrite(tmp_path: os.PathLike[str]) -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact},channel-shuffle{rule=all, "
                               "fold=false}", verify=False)
    path = os.path.join(str(tmp_path), "model.pt")
    torch.save({"module": result.module, "x": x, "y": result.module(x).detach()}, path)
    script = ("import sys; sys.modules['fxrewrite'] = None\n"  # any import of fxrewrite now fails
              "import torch\n"
              f"d = torch.load({path!r}, weights_only=False)\n"
              "torch.testing.assert_close(d['module'](d['x']), d['y'])\n"
              "print(type(d['module'].get_submodule('layer1.0.conv1')).__name__)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""}, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Sequential"


def test_generated_code_stays_readable() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    before = fxrewrite.rewrite(model, (x,), verify=False).module.code
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1},channel-shuffle{rule=all, "
                               "fold=false}", verify=False)
    code = result.module.code
    rewritten = [r for r in result.report.records if r.status == "rewritten"]
    separable = [r for r in rewritten if r.pass_name == "depthwise-separable"]
    shuffles = [r for r in rewritten if r.pass_name == "channel-shuffle"]
    assert len(separable) == 5 and len(shuffles) == 1
    lines = [line for line in code.splitlines() if line.strip()]
    before_lines = [line for line in before.splitlines() if line.strip()]
    # one extra line per separable site (two convs instead of one), three per shuffle, nothing else
    assert len(lines) == len(before_lines) + len(separable) + 3 * len(shuffles)
    assert "fxrewrite" not in code and "import" not in code
    assert "getattr(getattr(self.layer1, \"0\").conv1, \"0\")" in code
    assert ".unflatten(1, (2, 2))" in code and ".transpose(1, 2)" in code and ".flatten(1, 2)" in code


@pytest.mark.parametrize("passes", [*ALL_PASSES, "channel-shuffle{rule=all, fold=false}"])
def test_input_model_is_never_mutated(passes: str) -> None:
    torch.manual_seed(0)
    model = Net().train()
    model.layer1[0].conv2.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # const_data_ptr: the memory a parameter reads, without asking to write it (data_ptr() would materialise a
    # copy-on-write tensor: on the CPU the rewrite's kept weights share the input's memory until either is written)
    params = {k: (id(p), p.requires_grad, p.const_data_ptr()) for k, p in model.named_parameters()}
    modules = {k: (type(m), m.training) for k, m in model.named_modules()}
    fxrewrite.rewrite(model, (torch.randn(2, 3, 8, 8),), passes=passes, verify=False)
    assert {k: (type(m), m.training) for k, m in model.named_modules()} == modules
    assert {k: (id(p), p.requires_grad, p.const_data_ptr()) for k, p in model.named_parameters()} == params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # a GraphModule input is copied too
    gm = fxrewrite.trace(model)
    code, gm_state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    fxrewrite.rewrite(gm, (torch.randn(2, 3, 8, 8),), passes=passes, verify=False)
    assert gm.code == code and all(torch.equal(v, gm_state[k]) for k, v in gm.state_dict().items())
