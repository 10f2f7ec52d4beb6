"""Tests for graph.capture (and shape propagation): deep copies, semantics kept, and errors that name the user's
file:line, torch's message and the fix."""

from __future__ import annotations

import os
import warnings
from typing import Any

import models
import pytest
import torch
from models import CAPTURE, EXPECTED, UNTRACEABLE, ZOO, example_input, marker_line
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError, FxRewriteError, TraceFailure
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.graph.sites import find_sites

MODELS_FILE = os.path.basename(models.__file__)
THIS_FILE = os.path.basename(__file__)


def this_file_line(marker: str) -> int:
    with open(__file__, encoding="utf-8") as f:
        lines = [i for i, text in enumerate(f, start=1) if text.rstrip().endswith(f"# {marker}")]
    assert len(lines) == 1
    return lines[0]


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything trace/plan must leave alone: tensor values, parameter identity, training flags, hooks."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "param_ids": {k: id(p) for k, p in model.named_parameters()},
        "buffer_ids": {k: id(b) for k, b in model.named_buffers()},
        "module_ids": {k: id(m) for k, m in model.named_modules()},
        "training": {k: m.training for k, m in model.named_modules()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "hooks": {k: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
                  for k, m in model.named_modules()},
        "types": {k: type(m) for k, m in model.named_modules()},
    }


def assert_unchanged(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for key in ("param_ids", "buffer_ids", "module_ids", "training", "requires_grad", "hooks", "types"):
        assert before[key] == after[key], key


@pytest.mark.parametrize("key", sorted(EXPECTED))
@pytest.mark.parametrize("training", [True, False])
def test_trace_and_plan_never_mutate_the_model(key: str, training: bool, seeded: None) -> None:
    model = ZOO[key]().train(training)
    before = snapshot(model)
    gm = trace(model, **CAPTURE.get(key, {}))  # type: ignore[arg-type]
    assert isinstance(gm, torch.fx.GraphModule)
    assert not any(p is q for p in gm.parameters() for q in model.parameters())  # a deep copy
    fxrewrite.plan(model, (example_input(model),), **CAPTURE.get(key, {}))  # type: ignore[arg-type]
    assert_unchanged(before, model)


@pytest.mark.parametrize("passes", ["depthwise-separable{rank=1}", "grouped{groups=2}"])
def test_plan_and_rewrite_with_passes_never_mutate_the_model(passes: str, seeded: None) -> None:
    model = models.Residual().train()
    before = snapshot(model)
    x = example_input(model)
    fxrewrite.plan(model, (x,), passes)
    assert_unchanged(before, model)
    fxrewrite.rewrite(model, (x,), passes)
    assert_unchanged(before, model)


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_traced_module_computes_what_the_model_computes(key: str, seeded: None) -> None:
    model = ZOO[key]().eval()
    x = example_input(model)
    gm = trace(model, **CAPTURE.get(key, {}))  # type: ignore[arg-type]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


def test_graph_module_is_accepted_and_copied(seeded: None) -> None:
    gm = torch.fx.symbolic_trace(models.Plain())
    before = snapshot(gm)
    copy = trace(gm)
    assert copy is not gm and copy.code == gm.code
    with torch.no_grad():
        copy.conv1.weight.add_(1.0)
    assert_unchanged(before, gm)


def test_model_that_is_a_conv_is_traced(seeded: None) -> None:
    conv = nn.Conv2d(3, 8, 3)
    gm = trace(conv)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(gm(x), conv(x))
    assert [(s.name, s.module_type) for s in find_sites(gm)] == [("conv", "Conv2d")]


# --- errors that point at the user's code --------------------------------------------------------------------


class LocalBranch(nn.Module):
    """A data-dependent ``if`` written in this test file."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:  # LOCAL-IF
            return y
        return -y


def test_data_dependent_if_names_this_file_and_line() -> None:
    with pytest.raises(TraceFailure) as info:
        trace(LocalBranch())
    message = str(info.value)
    assert f"{THIS_FILE}:{this_file_line('LOCAL-IF')}" in message
    assert "if y.sum() > 0:" in message  # the code itself
    assert "cannot be used as inputs to control flow" in message  # torch's message
    assert "torch.where" in message  # the fix for the model's own forward


def test_data_dependent_if_in_the_zoo_names_models_py_and_line() -> None:
    with pytest.raises(TraceFailure) as info:
        trace(models.DataDependent())
    assert f"{MODELS_FILE}:{marker_line('DATA-DEPENDENT-IF')}" in str(info.value)
    assert isinstance(info.value, FxRewriteError)
    assert info.value.__cause__ is not None  # torch's exception is chained


def test_flag_argument_suggests_concrete_args_and_they_fix_it(seeded: None) -> None:
    model = models.FlagForward().eval()
    with pytest.raises(TraceFailure) as info:
        trace(model)
    message = str(info.value)
    assert f"{MODELS_FILE}:{marker_line('FLAG-BRANCH')}" in message
    assert "concrete_args={'use_second': <value>}" in message
    x = example_input(model)
    for flag, names in ((True, ["first", "second"]), (False, ["first"])):
        gm = trace(model, concrete_args={"use_second": flag})
        propagate_shapes(gm, (x,))
        assert [s.name for s in find_sites(gm)] == names
        with torch.no_grad():  # the specialised value is the default: gm(x) runs the traced branch
            torch.testing.assert_close(gm(x), model(x, use_second=flag))


class ModeArgument(nn.Module):
    """A flag without a default: ``forward(x, mode: str)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "double":  # MODE-IF
            return self.conv(x) * 2
        return self.conv(x)


def test_flag_without_default_suggests_concrete_args(seeded: None) -> None:
    with pytest.raises(TraceFailure) as info:
        trace(ModeArgument())
    assert f"{THIS_FILE}:{this_file_line('MODE-IF')}" in str(info.value)
    assert "concrete_args={'mode': <value>}" in str(info.value)
    gm = trace(ModeArgument(), concrete_args={"mode": "double"})
    assert len(find_sites(gm)) == 1


def test_len_in_a_helper_suggests_autowrap_and_it_fixes_it(seeded: None) -> None:
    model = models.UsesLen().eval()
    with pytest.raises(TraceFailure) as info:
        trace(model)
    message = str(info.value)
    assert "halve_channels" in message and MODELS_FILE in message
    assert "autowrap_functions=[halve_channels]" in message
    assert "torch.fx.wrap" in message
    assert "'len' is not supported" in message  # torch's message
    gm = trace(model, autowrap_functions=UNTRACEABLE["uses-len"]["autowrap_functions"])  # type: ignore[arg-type]
    x = example_input(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    assert [s.name for s in find_sites(gm)] == ["conv", "head"]


class LenInForward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[: len(x)]  # LEN-IN-FORWARD


def test_len_in_forward_suggests_shape_and_fx_wrap() -> None:
    with pytest.raises(TraceFailure) as info:
        trace(LenInForward())
    message = str(info.value)
    assert f"{THIS_FILE}:{this_file_line('LEN-IN-FORWARD')}" in message
    assert "x.shape[0]" in message and "torch.fx.wrap" in message


def test_submodule_control_flow_suggests_leaf_modules_and_it_fixes_it(seeded: None) -> None:
    model = models.SubmoduleDataDependent().eval()
    with pytest.raises(TraceFailure) as info:
        trace(model)
    message = str(info.value)
    assert f"{MODELS_FILE}:{marker_line('GATE-IF')}" in message
    assert "leaf_modules=['block']" in message
    gm = trace(model, leaf_modules=["block"])
    assert [s.name for s in find_sites(gm)] == ["stem", "head"]  # block.conv is hidden inside the leaf
    x = example_input(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    with pytest.warns(UserWarning, match="needs real values"):
        plan = fxrewrite.plan(model, (x,), leaf_modules=["block"])
    assert [(s.name, s.output_shape) for s in plan.sites] == [("stem", (2, 8, 16, 16)), ("head", (2, 4, 16, 16))]
    assert [s.name for s in find_sites(trace(model, leaf_modules=[models.Gate]))] == ["stem", "head"]


def test_nested_submodule_is_named_by_its_qualified_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Sequential(nn.ReLU(), models.Gate(8)))
    with pytest.raises(TraceFailure, match=r"leaf_modules=\['1\.1'\]"):
        trace(model)
    assert [s.name for s in find_sites(trace(model, leaf_modules=["1.1"]))] == ["0"]


def test_real_shape_fallback_restores_buffers(seeded: None) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), models.Gate(3)).train()
    gm = trace(model, leaf_modules=["1"])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.warns(UserWarning):
        propagate_shapes(gm, (torch.randn(2, 3, 8, 8) + 1,))
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tuple(next(n for n in gm.graph.nodes if n.target == "1").meta["val"].shape) == (2, 3, 8, 8)


def test_torchscript_exported_and_non_modules_are_refused() -> None:
    conv = nn.Conv2d(3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(conv)
    with pytest.raises(TraceFailure, match=r"TorchScript module.*original Python nn\.Module"):
        trace(scripted)
    exported = torch.export.export(conv, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(TraceFailure, match=r"ExportedProgram.*ep\.module\(\)"):
        trace(exported)
    with pytest.raises(TraceFailure, match=r"expected a torch\.nn\.Module, got function\. Wrap the function"):
        trace(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(TraceFailure, match=r"expected a torch\.nn\.Module, got int"):
        trace(3)  # type: ignore[arg-type]


def test_bad_capture_options_name_the_closest_valid_ones() -> None:
    model = models.SubmoduleDataDependent()
    with pytest.raises(ConfigError, match=r"'blok' names no submodule \(closest: block"):
        trace(model, leaf_modules=["blok"])
    with pytest.raises(ConfigError, match=r"'use_secnd' is not an argument of FlagForward\.forward; arguments: x, "
                                          r"use_second"):
        trace(models.FlagForward(), concrete_args={"use_secnd": True})
    with pytest.raises(ConfigError, match=r"qualified names or nn\.Module types"):
        trace(model, leaf_modules=[3])  # type: ignore[list-item]


def test_uncopyable_model_gives_a_trace_failure() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Conv2d(3, 8, 3)))  # old API: not deep-copyable
    with pytest.raises(TraceFailure, match=r"cannot deep-copy.*parametrizations"):
        trace(model)


def test_shape_propagation_errors_name_the_node(seeded: None) -> None:
    gm = trace(models.Plain())
    with pytest.raises(ConfigError, match=r"at node conv1 .*expected input.*3 channels"):
        propagate_shapes(gm, (torch.randn(1, 4, 8, 8),))
    with pytest.raises(ConfigError, match=r"tuple of positional inputs.*\(x,\)"):
        propagate_shapes(gm, torch.randn(1, 3, 8, 8))  # type: ignore[arg-type]


class CountingBatchNorm(nn.BatchNorm2d):
    """A user's BatchNorm2d subclass: torch.fx cannot trace through it (``if input.dim() != 4``) and fake
    propagation runs its real forward, whose ``num_batches_tracked += 1`` lands on the real buffer."""


def test_batchnorm_subclass_failure_points_at_the_submodule() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), CountingBatchNorm(4))
    with pytest.raises(TraceFailure) as info:
        trace(model)
    assert "in submodule '1' (CountingBatchNorm" in str(info.value)
    assert "leaf_modules=['1']" in str(info.value)


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, CountingBatchNorm])
def test_shape_propagation_leaves_training_mode_buffers_alone(bn: type[nn.BatchNorm2d], seeded: None) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), bn(4)).train()
    gm = trace(model, leaf_modules=[CountingBatchNorm])
    propagate_shapes(gm, (torch.randn(2, 3, 4, 4),))
    assert tuple(list(gm.graph.nodes)[2].meta["val"].shape) == (2, 4, 4, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(gm.state_dict()[k], v), k


def test_shape_shortcut_still_checks_channels() -> None:
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), nn.LayerNorm(7)))
    with pytest.raises(ConfigError, match="at node _1 "):
        propagate_shapes(gm, (torch.randn(2, 3, 4, 7),))
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm(6)))
    with pytest.raises(ConfigError, match="at node _2 "):
        propagate_shapes(gm, (torch.randn(2, 3, 4, 7),))


class Elementwise(nn.Module):
    """Every shortcut of the shape propagation (shape-preserving modules and functions, in place and not, equal
    and broadcast operands) next to what must dispatch (a strided view, a broadcast add)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        z = torch.nn.functional.relu(self.conv2(y), inplace=True)
        z += y
        z = torch.sigmoid(z) * torch.tanh(y) + torch.nn.functional.hardswish(z)
        view = z[:, :, ::2]  # a strided view: its consumers dispatch
        w = self.bn(torch.relu(view).contiguous()) + z.mean(dim=1, keepdim=True)[:, :, ::2]  # broadcast
        return torch.nn.functional.silu(w) + torch.nn.functional.gelu(view)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", ["elementwise", "resnet18", "mobilenet_v3_small"])
def test_shape_shortcuts_record_what_dispatch_and_real_execution_give(name: str, memory_format: torch.memory_format,
                                                                      seeded: None) -> None:
    import torchvision
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    model = {"elementwise": Elementwise, "resnet18": torchvision.models.resnet18,
             "mobilenet_v3_small": torchvision.models.mobilenet_v3_small}[name]().eval()
    model = model.to(memory_format=memory_format)
    x = torch.randn(1, 3, 32, 32).to(memory_format=memory_format)
    gm = trace(model)

    def metadata() -> list[tuple[object, ...]]:
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op != "output"]
        return [(tuple(v.shape), v.stride(), v.dtype, v.device) if isinstance(v, torch.Tensor) else v for v in vals]

    propagate_shapes(gm, (x,))
    ours = metadata()
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)  # no shortcuts
    assert ours == metadata()
    seen: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            seen[n.name] = (tuple(out.shape), out.stride(), out.dtype, out.device) if isinstance(
                out, torch.Tensor) else out
            return out

    with torch.no_grad():
        Recorder(gm).run(x.clone())

    def loose(m: object) -> object:  # a stride along a size-1 dim is arbitrary (fake and real pick differently)
        if not isinstance(m, tuple) or len(m) != 4 or not isinstance(m[0], tuple):
            return m
        return m[0], tuple(s if d > 1 else None for d, s in zip(m[0], m[1], strict=True)), m[2], m[3]

    assert [loose(m) for m in ours] == [loose(seen[n.name]) for n in gm.graph.nodes if n.op != "output"]


def test_deferred_code_generation_gives_a_plain_graph_module(tmp_path: Any) -> None:
    """A capture without generated code cannot be called; make_runnable turns it into what torch itself builds
    (class, code, pickling, deepcopy), and rewrite(), which captures that way, returns such a module."""
    import copy

    import fxrewrite
    from fxrewrite.graph.capture import make_runnable

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace(model, runnable=False)
    with pytest.raises(NotImplementedError):
        gm(x)
    assert make_runnable(gm) is gm
    reference = torch.fx.symbolic_trace(model)
    assert type(gm).__qualname__ == type(reference).__qualname__ and type(gm).__mro__[1] is torch.fx.GraphModule
    assert gm.code == reference.code
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    generated: list[int] = []
    real_recompile = torch.fx.GraphModule.recompile

    def counting(self: torch.fx.GraphModule) -> Any:
        generated.append(1)
        return real_recompile(self)

    torch.fx.GraphModule.recompile = counting  # type: ignore[method-assign]
    try:
        result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}")
    finally:
        torch.fx.GraphModule.recompile = real_recompile  # type: ignore[method-assign]
    assert len(generated) == 1  # the code is generated once, after the pass (twice before)
    out = result.module
    assert type(out).__qualname__ == type(reference).__qualname__ and result.ok
    torch.save(out, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for twin in (loaded, copy.deepcopy(out)):
        torch.testing.assert_close(twin(x), out(x), rtol=0, atol=0)
