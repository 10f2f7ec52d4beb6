"""Tests for fxrewrite.frontends.exported: rewriting the ATen-level convolutions of a torch.export ExportedProgram."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.frontends.exported import rewrite_exported, to_conv_modules

X64 = (1, 3, 64, 64)


def _conv_nodes(ep: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    return [n for n in ep.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)]


def _groups(ep: torch.export.ExportedProgram) -> list[int]:
    """The groups argument of every ATen convolution of ``ep``, in graph order."""
    out = []
    for n in _conv_nodes(ep):
        index = 6 if n.target is torch.ops.aten.conv2d.default else 8
        out.append(int(n.args[index]) if len(n.args) > index else 1)
    return out


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval(), torch.randn(*X64)


@pytest.fixture(scope="module")
def mobilenet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None).eval(), torch.randn(*X64)


def test_resnet18_program_is_rewritten_like_the_eager_model(resnet, tmp_path) -> None:
    model, x = resnet
    ep = torch.export.export(model, (x,))
    n_before = len(list(ep.graph.nodes))
    passes = "grouped{groups=4}"
    result = rewrite_exported(ep, (x,), passes, verify=False)  # checked below, against the eager rewrite
    eager = fxrewrite.rewrite(model, (x,), passes=passes, verify=False)
    assert isinstance(result.module, torch.export.ExportedProgram)
    # same decisions, same site names, same weights as rewriting the eager model
    assert [(r.site, r.status, r.code) for r in result.report.records] == \
           [(r.site, r.status, r.code) for r in eager.report.records]
    assert sorted(result.module.state_dict) == sorted(eager.module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(result.module.module()(x), eager.module(x), rtol=1e-5, atol=1e-5)
    # every ATen convolution was converted (20 in resnet18), the grouped ones appear with groups=4
    conversion = result.report.context["exported_program"]
    assert len(conversion["converted"]) == len(_conv_nodes(ep)) == 20 and conversion["not_converted"] == {}
    n_grouped = sum(r.status == "rewritten" for r in result.report.records)
    assert n_grouped > 0 and _groups(result.module).count(4) == n_grouped
    # the input program is untouched; the result saves, loads and re-exports
    assert len(list(ep.graph.nodes)) == n_before and _groups(ep).count(4) == 0
    torch.export.save(result.module, tmp_path / "r.pt2")
    loaded = torch.export.load(tmp_path / "r.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), result.module.module()(x), rtol=0, atol=0)
    again = torch.export.export(result.module.module(), (x,))
    assert _groups(again) == _groups(result.module)


def test_mobilenet_v2_program_decomposed_to_aten_convolution(mobilenet) -> None:
    model, x = mobilenet
    ep = torch.export.export(model, (x,)).run_decompositions()
    assert {n.target for n in _conv_nodes(ep)} == {torch.ops.aten.convolution.default}
    # example inputs: the ones stored in the program; numbers checked below
    result = rewrite_exported(ep, None, "depthwise-separable{rank=exact}", verify=False)
    rewritten = [r.site for r in result.report.records if r.status == "rewritten"]
    assert rewritten == ["features.0.0"]  # the only dense kxk conv: the others are 1x1 or already depthwise
    assert len(result.report.context["exported_program"]["converted"]) == len(_conv_nodes(ep)) == 52
    with torch.no_grad():
        torch.testing.assert_close(result.module.module()(x), model(x), rtol=1e-4, atol=1e-5)
    assert _groups(result.module).count(3) == 1  # the new depthwise 3x3 on the 3-channel input


def test_mobilenet_v2_grouped_program_replays_on_the_eager_model(mobilenet, tmp_path) -> None:
    pytest.importorskip("safetensors")
    from fxrewrite.io.artifacts import save
    from fxrewrite.io.replay import load_rewritten
    model, x = mobilenet
    result = rewrite_exported(torch.export.export(model, (x,)), (x,), "grouped{groups=8}",
                              select="features.1[0-7].*", verify=False)
    n = sum(r.status == "rewritten" for r in result.report.records)
    assert n > 0 and _groups(result.module).count(8) == n
    save(result, tmp_path / "m.safetensors")
    torch.manual_seed(3)
    rebuilt = load_rewritten(torchvision.models.mobilenet_v2(weights=None), tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), result.module.module()(x), rtol=1e-5, atol=1e-6)


class _Awkward(nn.Module):
    """A conv whose weight is a buffer, two convs sharing one weight, and a plain conv."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.randn(8, 4, 3, 3))
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.plain = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.fixed, padding=1)
        x = self.shared(self.shared(x))
        return self.plain(x)


def test_ineligible_aten_convolutions_are_left_alone_with_a_reason() -> None:
    torch.manual_seed(0)
    model, x = _Awkward().eval(), torch.randn(1, 4, 8, 8)
    ep = torch.export.export(model, (x,))
    gm = ep.module()
    conversion = to_conv_modules(gm, set(ep.graph_signature.parameters))
    assert list(conversion.converted.values()) == ["plain"]
    reasons = list(conversion.not_converted.values())
    assert len(reasons) == 3
    assert sum("not a parameter" in r for r in reasons) == 1 and sum("more than one node" in r for r in reasons) == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    result = rewrite_exported(ep, (x,), "grouped{groups=2}")  # verified by fxrewrite.rewrite (the default)
    assert result.verification is not None and result.verification.ok is not False
    assert [(r.site, r.status) for r in result.report.records] == [("plain", "rewritten")]
    assert _groups(result.module) == [1, 1, 1, 2]


def test_rewrite_exported_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="ExportedProgram"):
        rewrite_exported(nn.Conv2d(3, 3, 3), (torch.randn(1, 3, 8, 8),), "grouped{groups=3}")
    ep = torch.export.export(nn.Conv2d(4, 4, 3), (torch.randn(1, 4, 8, 8),))
    with pytest.raises(ConfigError, match=r"\(x,\)"):
        rewrite_exported(ep, torch.randn(1, 4, 8, 8), "grouped{groups=2}")


def test_rewrite_of_an_exported_program_refuses_options_it_cannot_honour() -> None:
    import fxrewrite
    x = torch.randn(1, 4, 8, 8)
    ep = torch.export.export(nn.Conv2d(4, 4, 3), (x,))
    for kwargs, named in (({"target": fxrewrite.Target(macs=0.5)}, "target"), ({"partial": True}, "partial"),
                          ({"leaf_modules": ["m"]}, "leaf_modules"), ({"calibration": [(x,)]}, "calibration"),
                          ({"concrete_args": {}, "drop_hooks": True}, "drop_hooks, concrete_args")):
        with pytest.raises(ConfigError, match=f"^{named} not supported for an ExportedProgram"):
            fxrewrite.rewrite(ep, (x,), "grouped{groups=2}", **kwargs)


class _BatchNorms(nn.Module):
    """An affine and a non-affine BatchNorm2d after a conv, one BatchNorm2d called twice, a BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn, self.plain, self.shared = nn.BatchNorm2d(8), nn.BatchNorm2d(8, affine=False), nn.BatchNorm2d(8)
        self.bn1d = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(torch.relu(self.plain(self.bn(self.conv(x)))), 2)
        return self.bn1d(self.shared(self.shared(y)).flatten(2))


def _batch_norms() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _BatchNorms().eval()
    for bn in (model.bn, model.plain, model.shared, model.bn1d):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("decomposed", [False, True])
def test_batch_norms_become_modules_sharing_the_program_tensors(decomposed: bool) -> None:
    model, x = _batch_norms()
    ep = torch.export.export(model, (x,))
    ep = ep.run_decompositions() if decomposed else ep
    gm = ep.module()
    conversion = to_conv_modules(gm, set(ep.graph_signature.parameters))
    assert list(conversion.batch_norms.values()) == ["bn", "plain"]
    reasons = list(conversion.batch_norms_not_converted.values())
    assert len(reasons) == 3 and sum("shared batch norm" in r for r in reasons) == 2
    assert sum("not a 2-D batch norm" in r for r in reasons) == 1
    for name, affine in (("bn", True), ("plain", False)):
        bn = gm.get_submodule(name)
        assert type(bn) is nn.BatchNorm2d and bn.affine is affine and not bn.training
        assert bn.running_var is ep.state_dict[f"{name}.running_var"]  # the program's own tensors, not copies
    assert gm.bn.weight is ep.state_dict["bn.weight"]
    # only the three ATen batch norms left alone remain (with their output items when decomposed)
    bn_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    items = [n for n in gm.graph.nodes if n.target is operator.getitem and n.args[0] in bn_nodes]
    assert len(bn_nodes) == 3 and len(items) == (3 if decomposed else 0)
    assert sorted(gm.state_dict()) == sorted(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    again = torch.export.export(gm, (x,))  # re-exported in inference mode: no running statistic is updated
    assert again.graph_signature.buffers_to_mutate == {}
    with torch.no_grad():
        torch.testing.assert_close(again.module()(x), model(x), rtol=0, atol=0)


def test_batch_norms_of_a_training_mode_program_are_left_alone() -> None:
    model, x = _batch_norms()
    ep = torch.export.export(model.train(), (x,))
    conversion = to_conv_modules(ep.module(), set(ep.graph_signature.parameters))
    assert conversion.batch_norms == {} and list(conversion.converted.values()) == ["conv"]
    assert set(conversion.batch_norms_not_converted.values()) == {"batch norm in training mode (batch statistics)"}
    assert len(conversion.batch_norms_not_converted) == 5
