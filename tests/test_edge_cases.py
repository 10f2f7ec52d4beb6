"""Bad input and edge cases: one test per case of the list below, named after it, each asserting the expected
behaviour of the public API (``fxrewrite.rewrite`` / ``plan`` / ``rewrite_partial`` / ``save``).

Where a case is already covered at a lower level, the test here checks it end to end and says where the rest is:
capture errors in test_capture.py, site reasons in test_sites.py, selection in test_select.py, atomic writes in
test_artifacts.py. A case that needs a change in a file this suite's author does not own is written as the expected
behaviour and marked ``xfail(strict=True, reason="needs <file>: <change>")``: it turns into a failure as soon as the
change lands, so the mark is removed then.

 1. not an nn.Module                              13. two rules on one site
 2. an ExportedProgram or a ScriptModule          14. padding_mode reflect with padding >= input size
 3. data-dependent if                             15. even kernels with padding='same'
 4. flag arguments (concrete_args)                16. frozen weights
 5. len() on a proxy                              17. train mode
 6. convs hidden in leaf modules                  18. fp16 / bf16 / fp64
 7. functional conv with a computed weight        19. a model on the meta device
 8. Conv2d subclasses                             20. channels_last
 9. one conv called from two sites                21. parametrized weights
10. tied weights                                  22. hooks on a target conv
11. groups that do not divide the channels        23. unbatched (C, H, W) input
12. a selector that matches nothing               24. an interrupted or failing write
and "nothing lost": 25. the input model is never mutated, 26. configuration errors are reported together, 27. a
failed run writes nothing and exits non-zero; 28. an in-place op after a conv (found while writing these).
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from pathlib import Path

import models
import pytest
import torch
import torch.nn.functional as F
import torchvision
from models import EXPECTED, ZOO, example_input, marker_line
from test_capture import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrize

import fxrewrite
from fxrewrite.errors import ConfigError, FxRewriteError, TraceFailure
from fxrewrite.frontends.partial import rewrite_partial
from fxrewrite.graph.capture import trace
from fxrewrite.graph.select import Rule
from fxrewrite.graph.sites import hidden_convs
from fxrewrite.io import artifacts

EXACT = "depthwise-separable{rank=exact}"
MODELS_FILE = os.path.basename(models.__file__)


def records(result: fxrewrite.RewriteResult | fxrewrite.Plan) -> list[tuple[str, str, str | None]]:
    return [(r.site, r.status, r.code) for r in result.report.records]


def chain() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()


# ---------------------------------------------------------------------------------------------- 1-2 bad input


@pytest.mark.parametrize(("thing", "got"), [(lambda x: x, "function"), (3, "int"), ("torchvision:resnet18", "str"),
                                            (torch.randn(2), "Tensor")])
def test_not_an_nn_module(thing: object, got: str) -> None:
    x = torch.randn(1, 3, 8, 8)
    for call in (fxrewrite.rewrite, fxrewrite.plan, rewrite_partial):
        with pytest.raises(TraceFailure, match=rf"expected a torch\.nn\.Module, got {got}"):
            call(thing, (x,), EXACT)  # type: ignore[operator]


def test_exported_program_or_script_module(seeded: None) -> None:
    model = chain()
    x = torch.randn(1, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    for call in (fxrewrite.rewrite, fxrewrite.plan, rewrite_partial):
        with pytest.raises(TraceFailure, match=r"TorchScript module; torch\.fx cannot trace it\. Pass the original "
                                               r"Python nn\.Module"):
            call(scripted, (x,), EXACT)
    ep = torch.export.export(model, (x,))
    result = fxrewrite.rewrite(ep, (x,), EXACT)  # an ExportedProgram is rewritten as one (see test_exported.py)
    assert isinstance(result.module, torch.export.ExportedProgram)
    assert [s for s, status, _ in records(result) if status == "rewritten"] == ["0", "2"]
    torch.testing.assert_close(result.module.module()(x), model(x))
    with pytest.raises(TraceFailure, match=r"ExportedProgram.*ep\.module\(\)"):
        trace(ep)
    with pytest.raises(ConfigError, match=r"ExportedProgram is one graph already.*without partial"):
        rewrite_partial(ep, (x,), EXACT)


# ------------------------------------------------------------------------------------------ 3-6 capture


def test_data_dependent_if(seeded: None) -> None:
    model = models.DataDependent().eval()
    before = snapshot(model)
    with pytest.raises(TraceFailure) as info:
        fxrewrite.rewrite(model, (example_input(model),), EXACT)
    message = str(info.value)
    assert f"{MODELS_FILE}:{marker_line('DATA-DEPENDENT-IF')}" in message and "if x.mean() > 0:" in message
    assert "torch.where" in message  # the fix for the model's own forward
    assert isinstance(info.value, FxRewriteError) and info.value.__cause__ is not None
    assert_unchanged(before, model)
    # partial mode rewrites around it (tests/test_partial.py has the details)
    _, report, left_alone = rewrite_partial(model, (example_input(model),), EXACT)
    assert [e.qualname for e in left_alone] == [""] and [r.site for r in report.records] == ["conv"]


def test_flag_arguments_concrete_args(seeded: None) -> None:
    model = models.FlagForward().eval()
    x = example_input(model)
    with pytest.raises(TraceFailure, match=r"concrete_args=\{'use_second': <value>\}"):
        fxrewrite.rewrite(model, (x,), EXACT)
    result = fxrewrite.rewrite(model, (x,), EXACT, concrete_args={"use_second": True})
    assert records(result) == [("first", "rewritten", None), ("second", "rewritten", None)] and result.ok
    with torch.no_grad():
        want = model(x, use_second=True)
        torch.testing.assert_close(result.module(x), want)  # the specialised value is the default
        torch.testing.assert_close(result.module(x, use_second=True), want)  # and the argument keeps its name
        with pytest.raises(AssertionError, match="use_second has been specialized to have value True"):
            result.module(x, use_second=False)  # the other branch was not traced: a loud error, never a wrong answer


def test_flag_arguments_concrete_args_other_than_the_default(seeded: None) -> None:
    model = models.FlagForward().eval()
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT, concrete_args={"use_second": False})
    assert records(result) == [("first", "rewritten", None)] and result.ok
    with torch.no_grad():
        torch.testing.assert_close(result.module(x, use_second=False), model(x, use_second=False))
    # not called: the traced module does not hold it, and the report lists it as not visible
    assert "second" not in dict(result.module.named_modules()) and hidden_convs(result.module) == []
    assert [(h.name, h.container, h.reason.code) for h in result.report.not_visible] == [
        ("second", None, "not-visible")]
    assert "second: not-visible: no node of the traced graph calls it" in str(result.report)


def test_len_on_a_proxy(seeded: None) -> None:
    model = models.UsesLen().eval()
    x = example_input(model)
    with pytest.raises(TraceFailure, match=r"autowrap_functions=\[halve_channels\]"):
        fxrewrite.rewrite(model, (x,), EXACT)
    result = fxrewrite.rewrite(model, (x,), EXACT, autowrap_functions=[models.halve_channels])
    assert records(result) == [("conv", "rewritten", None), ("head", "skipped", "pointwise-kernel")]
    assert result.ok and "halve_channels" in result.module.code
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))


def test_convs_hidden_in_leaf_modules_are_reported_as_not_visible(seeded: None) -> None:
    model = models.SubmoduleDataDependent().eval()
    x = example_input(model)
    with pytest.warns(UserWarning, match="needs real values"):  # the leaf's data-dependent branch runs for real
        result = fxrewrite.rewrite(model, (x,), EXACT, leaf_modules=["block"], verify=False)
    assert [r.site for r in result.report.records] == ["stem", "head"]  # block.conv is not a site
    hidden = hidden_convs(result.module)
    assert [(h.name, h.container, h.reason.code) for h in hidden] == [("block.conv", "block", "not-visible")]
    assert "leaf module" in hidden[0].reason.text
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))


def test_convs_hidden_in_leaf_modules_are_listed_in_the_report(seeded: None) -> None:
    model = models.SubmoduleDataDependent().eval()
    with pytest.warns(UserWarning):
        plan = fxrewrite.plan(model, (example_input(model),), EXACT, leaf_modules=["block"])
    assert "block.conv" in str(plan) and "not-visible" in str(plan)


def test_convs_hidden_in_data_dependent_leaf_modules_verify(seeded: None) -> None:
    model = models.SubmoduleDataDependent().eval()
    with pytest.warns(UserWarning):
        result = fxrewrite.rewrite(model, (example_input(model),), EXACT, leaf_modules=["block"])
    assert result.ok and result.verification.numerics_checked


# ------------------------------------------------------------------------------------- 7-10 site kinds


def test_functional_conv_with_a_computed_weight(seeded: None) -> None:
    model = models.FunctionalConv().eval()
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert records(result) == [("conv2d", "rewritten", None), ("conv2d_1", "skipped", "pointwise-kernel"),
                               ("conv2d_2", "skipped", "computed-weight")]
    skipped = result.report.records[2]
    assert "computed in the graph" in skipped.reason
    assert result.ok and result.verification.level.startswith("float level")
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))
    assert "mul" in result.module.code and "scale" in result.module.code  # the computed weight is still computed


class StdConv2d(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d): the weight is normalised on every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Subclasses(nn.Module):
    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.same = models.SameConv(8, 8, 3, stride=2)  # Conv2dSame-like: padding computed from the input size
        self.std = StdConv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.std(self.same(self.plain(x)))


def test_conv2d_subclasses(seeded: None) -> None:
    model = Subclasses().eval()
    x = torch.randn(2, 3, 15, 15)  # odd size: SameConv pads asymmetrically
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert records(result) == [("plain", "rewritten", None), ("same", "skipped", "conv-subclass"),
                               ("std", "skipped", "conv-subclass")]
    reasons = {r.site: r.reason for r in result.report.records}
    assert "SameConv subclasses nn.Conv2d with its own forward" in reasons["same"]
    assert type(result.module.same) is models.SameConv and type(result.module.std) is StdConv2d
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))
        y = torch.randn(1, 3, 16, 16)  # another size: the dynamic padding is still computed per call
        torch.testing.assert_close(result.module(y), model(y))


def test_one_conv_called_from_two_sites(seeded: None) -> None:
    model = models.SharedConv().eval()
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    shared = [(s, code) for s, status, code in records(result) if s == "shared"]
    assert shared == [("shared", "shared-module"), ("shared", "shared-module")]  # a skip, with its reason
    assert "called from 2 places" in result.report.records[0].reason
    gm = result.module
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("shared")]
    assert calls == ["shared", "shared"] and type(gm.shared) is nn.Conv2d  # one module, never two copies
    assert [n for n, _ in gm.named_parameters() if n.startswith("shared")] == ["shared.weight", "shared.bias"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_tied_weights(seeded: None) -> None:
    model = models.SharedConv().eval()
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    tied = {s: code for s, status, code in records(result) if s in ("a", "b")}
    assert tied == {"a": "tied-weight", "b": "tied-weight"}
    assert ("free", "rewritten", None) in records(result)
    gm = result.module
    assert gm.a.weight is gm.b.weight and model.a.weight is model.b.weight
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


# ------------------------------------------------------------------------------- 11-13 configuration


def test_groups_that_do_not_divide_the_channels(seeded: None) -> None:
    model = models.OddChannels().eval()
    x = example_input(model)
    plan = fxrewrite.plan(model, (x,), "grouped{groups=2}")  # a global pass: every site skipped, with the numbers
    reasons = {r.site: (r.code, r.reason) for r in plan.records}
    assert reasons["conv2"] == ("channels-not-divisible", "conv2: in_channels=7, out_channels=11 not divisible by "
                                "groups=2; valid group counts: [].")
    assert all(code == "channels-not-divisible" for code, _ in reasons.values())


def test_groups_that_do_not_divide_the_channels_of_a_named_layer_is_an_error(seeded: None) -> None:
    model = models.Residual().eval()
    x = example_input(model)
    with pytest.raises(ConfigError, match=r"stem.*in_channels=8.*out_channels=16.*groups=3") as info:
        fxrewrite.plan(model, (x,), "grouped{groups=2}", select=[Rule("stem", options={"groups": 3}),
                                                                   Rule("grouped", options={"groups": 3})])
    assert "grouped" in str(info.value) and "in_channels=32" in str(info.value)  # both layers in one error


def test_a_selector_that_matches_nothing(seeded: None) -> None:
    model = models.Plain().train()
    before = snapshot(model)
    x = example_input(model)
    for call in (fxrewrite.plan, fxrewrite.rewrite):
        with pytest.raises(ConfigError, match=r"rule 'conv3' matches no convolution site; closest: conv[12], conv[12]"):
            call(model, (x,), EXACT, select=["conv3"])
        with pytest.raises(ConfigError, match=r"rule 'type:Conv3d' matches no convolution site; module types "
                                              r"present: Conv2d"):
            call(model, (x,), EXACT, select=["type:Conv3d"])
    assert_unchanged(before, model)


def test_two_rules_on_one_site(seeded: None) -> None:
    """Precedence (fxrewrite.graph.select): exact name > glob/regex > type > global; the later of equal rank wins."""
    model = models.Plain().eval()
    x = example_input(model)
    rules = [Rule("conv*", options={"rank": 1}), Rule("conv2", options={"rank": 2}), Rule(nn.Conv2d, skip=True),
             Rule("conv1", options={"rank": 3}), Rule("conv1", options={"rank": 4})]
    plan = fxrewrite.plan(model, (x,), "depthwise-separable{rank=1}", select=rules)
    by_site = {r.site: r for r in plan.records}
    assert {s: (r.status, r.rule, r.options["rank"]) for s, r in by_site.items()} == {
        "conv1": ("planned", "conv1 (rank=4)", 4), "conv2": ("planned", "conv2 (rank=2)", 2),
        "dw": ("skipped", "Conv2d (skip)", 1), "pw": ("skipped", "Conv2d (skip)", 1)}
    assert [r["rule"] for r in plan.report.to_dict()["records"]][:2] == ["conv1 (rank=4)", "conv2 (rank=2)"]
    result = fxrewrite.rewrite(model, (x,), "depthwise-separable{rank=1}", select=rules)
    assert result.module.conv1[0].out_channels == 3 * 4 and result.module.conv2[0].out_channels == 16 * 2


def test_two_rules_on_one_site_are_shown_in_the_plan_table(seeded: None) -> None:
    model = models.Plain().eval()
    plan = fxrewrite.plan(model, (example_input(model),), "depthwise-separable{rank=1}",
                          select=[Rule("conv*", options={"rank": 1}), Rule("conv2", options={"rank": 2})])
    line = next(line for line in str(plan.report).splitlines() if line.startswith("conv2 "))
    assert "conv2 (rank=2)" in line


# ------------------------------------------------------------------------------- 14-16 conv options


def test_reflect_padding_at_least_the_input_size(seeded: None) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=4, padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")).eval()
    small = torch.randn(1, 3, 4, 4)  # reflect padding 4 needs inputs larger than 4
    with pytest.raises(RuntimeError) as original:
        model(small)
    message = str(original.value).splitlines()[0]
    assert "Padding size should be less than the corresponding input dimension" in message
    with pytest.raises(ConfigError) as info:  # fxrewrite fails the same way, with torch's message and the node
        fxrewrite.rewrite(model, (small,), EXACT)
    assert message.split(" of input")[0] in str(info.value) and "at node _0" in str(info.value)
    result = fxrewrite.rewrite(model, (torch.randn(1, 3, 9, 9),), EXACT)  # a valid input: exact, reflect kept
    assert result.ok and result.module.get_submodule("0.0").padding_mode == "reflect"
    with pytest.raises(RuntimeError) as rewritten:  # and the rewritten model fails exactly as the original does
        result.module(small)
    assert type(rewritten.value) is type(original.value) and str(rewritten.value).splitlines()[0] == message


@pytest.mark.parametrize("passes", [EXACT, "grouped-separable{groups=2, rank=exact}", "grouped{groups=2}"])
def test_even_kernels_with_same_padding(passes: str, seeded: None) -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 4, padding="same"), nn.ReLU(),
                          nn.Conv2d(8, 8, (2, 4), padding="same", dilation=(1, 2))).double().eval()
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*even kernel lengths.*")  # torch's own, for the original too
        result = fxrewrite.rewrite(model, (x,), passes)
        assert [s for s, status, _ in records(result) if status == "rewritten"] == ["0", "2"]
        assert result.module.get_submodule("0.0" if passes != "grouped{groups=2}" else "0").padding == "same"
        out, want = result.module(x), model(x)
    assert out.shape == want.shape == (2, 8, 9, 10)
    if "exact" in passes:  # torch pads 'same' asymmetrically for even kernels; the kxk conv keeps that padding
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
        assert result.ok and result.verification.level.startswith("float level")


def test_frozen_weights(seeded: None) -> None:
    model = models.Plain().eval()
    model.conv1.requires_grad_(False)  # conv1 frozen, conv2 trainable
    before = snapshot(model)
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    grads = {n: p.requires_grad for n, p in result.module.named_parameters()}
    assert grads["conv1.0.weight"] is False and grads["conv1.1.weight"] is False
    assert grads["conv2.0.weight"] is True and grads["conv2.1.weight"] is True and grads["conv2.1.bias"] is True
    assert_unchanged(before, model)
    result.module(x).sum().backward()  # gradients flow to the trainable part only
    assert result.module.conv1[0].weight.grad is None and result.module.conv2[0].weight.grad is not None


# ------------------------------------------------------------------------------- 17-20 modes and devices


@pytest.mark.filterwarnings("ignore:.*is in training mode:UserWarning")  # test_train_mode_warns checks it
def test_train_mode_keeps_batch_norm_statistics(seeded: None) -> None:
    model = models.Plain().train()
    x = example_input(model)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    result = fxrewrite.rewrite(model, (x,), EXACT)
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k  # running_mean, running_var and num_batches_tracked unchanged
    assert model.training and model.bn1.training and result.module.training
    assert result.verification.mode == "eval" and result.ok
    assert torch.equal(result.module.bn1.running_mean, stats["bn1.running_mean"])


def test_train_mode_warns(seeded: None) -> None:
    model = models.Plain().train()
    x = example_input(model)
    with pytest.warns(UserWarning, match=r"Plain is in training mode \('bn1', a BatchNorm2d, computes differently "
                                         r"there\): the verification runs both models in eval mode"):
        fxrewrite.rewrite(model, (x,), EXACT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxrewrite.rewrite(model, (x,), EXACT, verify="shapes")  # no numerics, nothing to warn about
        fxrewrite.rewrite(chain().train(), (torch.randn(1, 4, 8, 8),), EXACT)  # convs and ReLU: the same in both
        fxrewrite.rewrite(model.eval(), (x,), EXACT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fp16_bf16_fp64(dtype: torch.dtype, seeded: None) -> None:
    model = models.Residual().eval().to(dtype)
    x = example_input(model).to(dtype)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert result.ok, result.verification.failures
    assert result.verification.dtype == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in result.module.parameters()} == {dtype}
    with torch.no_grad():
        out, want = result.module(x), model(x)
    assert out.dtype == dtype
    rtol, atol = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2), torch.float64: (1e-10, 1e-12)}[dtype]
    err = float((out.double() - want.double()).norm() / want.double().norm())
    assert err < rtol or float((out.double() - want.double()).abs().max()) < atol, err


def test_a_model_on_the_meta_device(seeded: None) -> None:
    model = models.Residual().to("meta")
    x = torch.empty(2, 8, 16, 16, device="meta")
    result = fxrewrite.rewrite(model, (x,), "depthwise-separable{rank=2, init=random}")
    assert [s for s, status, _ in records(result) if status == "rewritten"] == ["stem", "body.0", "body.2", "grouped"]
    assert all(t.device.type == "meta" for t in (*result.module.parameters(), *result.module.buffers()))
    assert not result.verification.numerics_checked and "meta device" in result.verification.numerics_reason
    costs = result.report.costs  # from shapes alone: stem 16 out x 16 x 16 x 2 (batch) pixels x 8 x 9
    assert costs.sites[0].site == "stem" and costs.sites[0].macs_before == 2 * 16 * 16 * 16 * 8 * 9
    assert costs.sites[0].macs_after == 2 * 16 * 16 * (8 * 2 * 9 + 16 * 8 * 2)
    # weights factorised from the trained ones need values: a meta model is listed, with the reason and the fix
    svd = fxrewrite.rewrite(model, (x,), "depthwise-separable{rank=2}")
    assert {code for _, status, code in records(svd) if status == "skipped"} == {"meta-weight", "pointwise-kernel"}
    assert "init=random" in next(r.reason for r in svd.report.records if r.code == "meta-weight")


def test_channels_last(seeded: None) -> None:
    model = models.Residual().eval().to(memory_format=torch.channels_last)
    x = example_input(model).to(memory_format=torch.channels_last)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert result.ok, result.verification.failures
    weights = {n: p for n, p in result.module.named_parameters() if p.dim() == 4}
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights.values())
    with torch.no_grad():
        out = result.module(x)
        torch.testing.assert_close(out, model(x))
    assert out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- 21-24 weights, hooks, io


def test_parametrized_weights_are_skipped_by_default_and_listed(seeded: None) -> None:
    model = models.ParametrizedConv().eval()
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert records(result) == [("wn", "skipped", "parametrized-weight"), ("sn", "skipped", "parametrized-weight"),
                               ("plain", "rewritten", None)]
    assert "wn: the weight is parametrized" in str(result.report)
    assert parametrize.is_parametrized(result.module.wn) and parametrize.is_parametrized(result.module.sn)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))


def test_hooks_on_a_target_conv_are_skipped_and_counted(seeded: None) -> None:
    model = models.HookedConv().eval()
    model.hooked.register_forward_pre_hook(lambda m, args: None)
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert records(result) == [("hooked", "skipped", "module-hooks"), ("plain", "rewritten", None)]
    assert "the module has 1 forward hook, 1 forward-pre hook" in result.report.records[0].reason
    assert len(result.module.hooked._forward_hooks) == 1 and len(result.module.hooked._forward_pre_hooks) == 1


def test_hooks_on_a_target_conv_are_dropped_by_an_explicit_flag(seeded: None) -> None:
    model = models.HookedConv().eval()
    model.hooked.register_forward_pre_hook(lambda m, args: None)
    x = example_input(model)
    result = fxrewrite.rewrite(model, (x,), EXACT, drop_hooks=True)
    hooked = result.report.records[0]
    assert (hooked.site, hooked.status, hooked.details["dropped_hooks"]) == ("hooked", "rewritten", 2)
    assert "dropped_hooks" not in result.report.records[1].details  # plain had none
    assert "hooks dropped (drop_hooks=True): hooked (2)" in str(result.report)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in result.module.modules())
    assert len(model.hooked._forward_hooks) == 1 and len(model.hooked._forward_pre_hooks) == 1  # the input keeps them
    assert result.ok  # the identity hook changes nothing, so the exact rewrite verifies
    plan = fxrewrite.plan(model, (x,), EXACT, drop_hooks=True)  # the plan says the same
    assert [(r.site, r.status, r.details.get("dropped_hooks")) for r in plan.records] == [
        ("hooked", "planned", 2), ("plain", "planned", None)]
    kept = fxrewrite.rewrite(model, (x,), "depthwise-separable{rank=exact}", select=["plain"], drop_hooks=True)
    assert len(kept.module.hooked._forward_hooks) == 1  # a conv that is not rewritten keeps its hooks
    with pytest.raises(ConfigError, match="drop_hooks=True cannot be combined with partial=True"):
        fxrewrite.rewrite(model, (x,), EXACT, drop_hooks=True, partial=True)


def test_unbatched_input(seeded: None) -> None:
    model = chain()
    x = torch.randn(4, 12, 12)  # (C, H, W): nn.Conv2d accepts it
    result = fxrewrite.rewrite(model, (x,), EXACT)
    assert result.ok and [s for s, status, _ in records(result) if status == "rewritten"] == ["0", "2"]
    with torch.no_grad():
        out = result.module(x)
        torch.testing.assert_close(out, model(x))
    assert out.shape == (8, 10, 10)
    costs = result.report.costs  # 8 out channels x 12 x 12 pixels x 4 in x 9, no batch dimension
    assert costs.sites[0].macs_before == 8 * 12 * 12 * 4 * 9


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["interrupted", "disk-full"])
def test_an_interrupted_or_failing_write(failure: BaseException, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         seeded: None) -> None:
    model = chain()
    x = torch.randn(1, 4, 8, 8)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    target = tmp_path / "model.pt2"
    target.write_bytes(b"the previous model")
    real_save = torch.export.save

    def save_then_fail(ep: torch.export.ExportedProgram, f: object, **kwargs: object) -> None:
        real_save(ep, f, **kwargs)  # the bytes are written to the temporary file, then the process is interrupted
        raise failure

    monkeypatch.setattr(torch.export, "save", save_then_fail)
    with pytest.raises(type(failure)):
        artifacts.save(result, target, (x,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]  # no temporary file left behind
    assert target.read_bytes() == b"the previous model"  # and the old file untouched
    monkeypatch.setattr(torch.export, "save", real_save)
    artifacts.save(result, target, (x,))
    loaded = torch.export.load(str(target))
    torch.testing.assert_close(loaded.module()(x), result.module(x))


# ------------------------------------------------------------------------------------------- nothing lost


@pytest.mark.filterwarnings("ignore:.*is in training mode:UserWarning")
@pytest.mark.parametrize("key", sorted(set(EXPECTED) - {"flag"}))
def test_the_input_model_is_never_mutated(key: str, seeded: None) -> None:
    model = ZOO[key]().train()  # train mode: a forward would update batch-norm statistics
    before = snapshot(model)
    x = example_input(model)
    for passes in (EXACT, "grouped{groups=2}", "grouped-separable{groups=2, rank=1}"):
        result = fxrewrite.rewrite(model, (x,), passes)
        assert not any(p is q for p in result.module.parameters() for q in model.parameters())
        assert_unchanged(before, model)
    rewrite_partial(model, (x,), EXACT)
    assert_unchanged(before, model)


def test_all_configuration_errors_are_reported_together(seeded: None) -> None:
    model = models.Plain()
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        fxrewrite.rewrite(model, (example_input(model),), "grouped{groups=1}", select=["conv9"],
                          leaf_modules=["bnn1"])
    message = str(info.value)
    assert "groups must be an integer >= 2" in message and "'conv9' matches no convolution site" in message
    assert "'bnn1' names no submodule" in message
    assert message.startswith("3 configuration errors (nothing was changed):\n  ")
    assert_unchanged(before, model)


def test_pass_level_configuration_errors_are_reported_with_the_others(seeded: None) -> None:
    """The checks a pass makes on its rules (a named layer's group count, unknown options) join the list too."""
    model = models.Residual()
    x = example_input(model)
    for call in (fxrewrite.plan, fxrewrite.rewrite):
        with pytest.raises(ConfigError) as info:
            call(model, (x,), "grouped{groups=2}", select=[Rule("stem", options={"groups": 3}), "conv9",
                                                            Rule("body.*", options={"groupz": 2})])
        lines = str(info.value).splitlines()
        assert lines[0] == "2 configuration errors (nothing was changed):"
        assert lines[1].startswith("  rule 'conv9' matches no convolution site; closest: ")
        assert re.fullmatch(r"  rule 'body\.\* \(groupz=2\)' sets options \['groupz'\] that pass 'grouped' does "
                            r"not have; valid: \['groups', .*\]; pass 'grouped': a rule names these layers, but "
                            r"their group count cannot be used there: stem: channels-not-divisible: in_channels=8, "
                            r"out_channels=16 not divisible by groups=3; valid group counts: \[2, 4, 8\]\. .*",
                            lines[2])
    with pytest.raises(ConfigError, match=r"^pass 'grouped': a rule names these layers"):  # one error: as it is
        fxrewrite.plan(model, (x,), "grouped{groups=2}", select=[Rule("stem", options={"groups": 3})])
    assert [r.code for r in fxrewrite.plan(model, (x,), "grouped{groups=3}", select=["stem*"]).records] == [
        "channels-not-divisible", "not-selected", "not-selected", "not-selected", "not-selected"]  # a pattern: a skip


def test_a_failed_run_writes_nothing_and_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fxrewrite.frontends.cli import main
    target = tmp_path / "model.pt2"
    argv = ["rewrite", "models:Residual", "--input-shape", "1,8,16,16", "--pass", "depthwise-separable{rank=1}",
            "--output", str(target)]
    assert main([*argv, "--rtol", "1e-6"]) == 1  # a lossy rewrite fails a tight gate: exit 1 ...
    assert list(tmp_path.iterdir()) == []  # ... and nothing is written, not even a temporary file
    assert main(argv) == 0 and target.is_file()
    x = torch.randn(1, 8, 16, 16)
    assert torch.export.load(str(target)).module()(x).shape == (1, 32, 16, 16)


def test_an_in_place_op_after_a_conv(seeded: None) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(1, 3, 8, 8)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))  # the rewrite is exact ...
    assert result.ok, result.verification.failures  # ... so the verification must pass
    assert result.verification.sites[0].local.rel_l2 < 1e-6


def test_an_exact_rewrite_of_torchvision_alexnet_verifies(seeded: None) -> None:
    """AlexNet's convs are each followed by ReLU(inplace=True): the case above on a real model (random weights, the
    smallest input AlexNet accepts: 63 -> conv 15 -> pool 7 -> pool 3 -> pool 1)."""
    model = torchvision.models.alexnet().eval()
    x = torch.randn(1, 3, 63, 63)
    result = fxrewrite.rewrite(model, (x,), EXACT)
    v = result.verification
    assert v.ok and v.numerics_checked, v.failures
    assert [s.site for s in v.sites] == ["features.0", "features.3", "features.6", "features.8", "features.10"]
    assert all(s.status == "ok" and s.local.rel_l2 < 1e-5 for s in v.sites)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)
