"""Tests for frontends.partial: rewriting inside the largest traceable submodules of models that do not trace as a
whole (lists of images, data-dependent control flow), with the rest left eager and reported."""

from __future__ import annotations

import os

import models
import pytest
import torch
from models import marker_line
from test_capture import assert_unchanged, snapshot
from torch import nn
from torchvision.models import detection, resnet18
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import fxrewrite
from fxrewrite.errors import ConfigError, ModelLoadError, TraceFailure
from fxrewrite.frontends.models import example_inputs, is_image_list_model, load_model
from fxrewrite.frontends.partial import LeftAlone, rewrite_partial
from fxrewrite.graph.select import Rule

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = "depthwise-separable{rank=exact}"
MODELS_FILE = os.path.basename(models.__file__)



def rewritten(report: fxrewrite.Report) -> list[str]:
    return [r.site for r in report.records if r.status == "rewritten"]


class PerImage(nn.Module):
    """Takes a list of images (not traceable as a whole); ``stem`` and ``head`` trace, ``gate`` does not."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = models.Gate(8)  # data-dependent `if x.amax() > 0`
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.head(self.gate(self.stem(image.unsqueeze(0)))) for image in images]


def images() -> list[torch.Tensor]:
    return [torch.randn(3, 12, 12), torch.randn(3, 10, 14)]


def test_a_model_that_traces_is_rewritten_as_a_whole(seeded: None) -> None:
    model = models.Residual().eval()
    x = models.example_input(model)
    new, report, left_alone = rewrite_partial(model, (x,), EXACT)
    assert left_alone == []
    assert isinstance(new, torch.fx.GraphModule)
    assert report.records == fxrewrite.rewrite(model, (x,), EXACT).report.records
    torch.testing.assert_close(new(x), model(x))


def test_list_input_rewrites_every_traceable_submodule(seeded: None) -> None:
    model = PerImage().eval()
    xs = images()
    new, report, left_alone = rewrite_partial(model, (xs,), EXACT)
    # stem and head trace; gate does not (data-dependent if), so its conv is traced on its own
    assert report.context["units"] == ["stem", "gate.conv", "head"]
    assert rewritten(report) == ["stem.0", "gate.conv", "head"]
    assert [e.qualname for e in left_alone] == ["", "gate"]
    assert left_alone[0].reason.startswith("takes a list argument (input 0)")
    assert f"{MODELS_FILE}:{marker_line('GATE-IF')}" in left_alone[1].reason  # where the trace failed
    assert left_alone[1].reason.endswith("its children were tried instead")
    assert isinstance(new.stem, torch.fx.GraphModule) and isinstance(new.gate, models.Gate)
    assert type(new.gate.conv) is nn.Sequential and type(model.gate.conv) is nn.Conv2d  # at the same name
    keys = set(new.state_dict())
    assert {"gate.conv.0.weight", "gate.conv.1.weight", "gate.conv.1.bias", "head.0.weight", "head.1.bias",
            "stem.0.0.weight", "stem.0.1.weight", "stem.1.running_mean"} <= keys, sorted(keys)
    with torch.no_grad():
        for got, want in zip(new(xs), model(xs), strict=True):
            torch.testing.assert_close(got, want)
    v = report.verification
    assert v.ok and v.numerics_checked, v.failures
    assert [s.site for s in v.sites] == ["stem.0", "gate.conv", "head"]
    assert "partial rewrite" in str(report) and "gate: does not trace" in str(report)


def test_submodule_not_called_on_the_example_inputs_is_reported(seeded: None) -> None:
    model = PerImage().eval()
    with torch.no_grad():  # make every stem output negative, so Gate never calls its conv
        model.stem[0].weight.zero_()
        model.stem[0].bias.fill_(-1.0)
        model.stem[2] = nn.Identity()
    xs = images()
    new, report, left_alone = rewrite_partial(model, (xs,), EXACT)
    assert rewritten(report) == ["stem.0", "head"]
    gate_conv = dict(left_alone)["gate.conv"]
    assert gate_conv.startswith("not called by the forward on the example inputs")
    assert type(new.gate.conv) is nn.Conv2d
    with torch.no_grad():
        for got, want in zip(new(xs), model(xs), strict=True):
            torch.testing.assert_close(got, want)


def test_data_dependent_root_names_the_file_and_line(seeded: None) -> None:
    model = models.DataDependent().eval()
    x = models.example_input(model)
    with pytest.raises(TraceFailure):
        fxrewrite.rewrite(model, (x,), EXACT)
    new, report, left_alone = rewrite_partial(model, (x,), EXACT)
    assert [e.qualname for e in left_alone] == [""]
    assert f"{MODELS_FILE}:{marker_line('DATA-DEPENDENT-IF')}" in left_alone[0].reason
    assert rewritten(report) == ["conv"]
    with torch.no_grad():
        torch.testing.assert_close(new(x), model(x))
        torch.testing.assert_close(new(-x), model(-x))  # the eager branch still follows the data


def test_selection_uses_qualified_names_across_submodules(seeded: None) -> None:
    model = PerImage().eval()
    xs = images()
    before = snapshot(model)
    _, report, _ = rewrite_partial(model, (xs,), EXACT, select=["gate.*", Rule("head", skip=True)])
    assert rewritten(report) == ["gate.conv"]
    skipped = {r.site: r for r in report.records if r.status == "skipped"}
    assert skipped["head"].code == "not-selected" and "head (skip)" in skipped["head"].reason
    assert skipped["stem.0"].code == "not-selected"
    with pytest.raises(ConfigError, match=r"rule 'gate\.conv2' matches no convolution site; closest: gate\.conv"):
        rewrite_partial(model, (xs,), EXACT, select=["gate.conv2"])
    assert_unchanged(before, model)


def test_rule_options_reach_the_submodule_that_holds_the_site(seeded: None) -> None:
    model = PerImage().eval()
    _, report, _ = rewrite_partial(model, (images(),), "depthwise-separable{rank=1}",
                                   select=[Rule("head", options={"rank": 2}), "stem.*"])
    ranks = {r.site: r.details.get("rank") for r in report.records if r.status == "rewritten"}
    assert ranks == {"stem.0": 1, "head": 2}
    assert {r.site: r.rule for r in report.records}["head"] == "head (rank=2)"


def test_errors_inside_a_submodule_name_it(seeded: None) -> None:
    with pytest.raises(ConfigError, match=r"partial mode, submodule 'head' \(Conv2d\).*does not have"):
        rewrite_partial(PerImage().eval(), (images(),), EXACT, select=[Rule("head", options={"bogus": 1})])


def test_leaf_modules_are_not_entered(seeded: None) -> None:
    model = PerImage().eval()
    _, report, left_alone = rewrite_partial(model, (images(),), EXACT, leaf_modules=["gate"])
    assert rewritten(report) == ["stem.0", "head"]
    assert dict(left_alone)["gate"].startswith("kept opaque by leaf_modules")


class CallsWithAFlag(nn.Module):
    """Calls a submodule with a keyword flag: the submodule traces with that flag fixed by concrete_args."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = models.FlagForward()

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.inner(image.unsqueeze(0), use_second=False) for image in images])


def test_keyword_flags_of_a_submodule_become_concrete_args(seeded: None) -> None:
    model = CallsWithAFlag().eval()
    xs = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    new, report, _ = rewrite_partial(model, (xs,), EXACT)
    assert report.context["units"] == ["inner"]
    assert rewritten(report) == ["inner.first"]  # the branch that uses `second` was not taken
    with torch.no_grad():
        torch.testing.assert_close(new(xs), model(xs))


class Shared(nn.Module):
    """An aliased submodule (``b is a``) and two convs that share one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
        self.b = self.a
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.d = nn.Conv2d(3, 3, 3, padding=1)
        self.d.weight = self.c.weight
        self.free = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images)
        return self.free(self.d(self.c(self.b(self.a(x)))))


def test_shared_modules_and_parameters_are_never_untied(seeded: None) -> None:
    model = Shared().eval()
    xs = [torch.randn(3, 8, 8)]
    new, report, left_alone = rewrite_partial(model, (xs,), EXACT)
    reasons = dict(left_alone)
    assert "reachable under several names" in reasons["a"]
    assert "shares the parameter 'd.weight'" in reasons["c"] and "shares the parameter 'c.weight'" in reasons["d"]
    assert rewritten(report) == ["free"]
    assert new.a is new.b and new.c.weight is new.d.weight
    with torch.no_grad():
        torch.testing.assert_close(new(xs), model(xs))


@pytest.mark.parametrize("training", [False, True])
def test_the_input_model_is_never_mutated(training: bool, seeded: None) -> None:
    model = PerImage().train(training)
    before = snapshot(model)
    new, _, _ = rewrite_partial(model, (images(),), EXACT)
    assert_unchanged(before, model)
    assert not any(p is q for p in new.parameters() for q in model.parameters())


def test_dry_run_plans_and_changes_nothing(seeded: None) -> None:
    model = PerImage().eval()
    xs = images()
    new, report, _ = rewrite_partial(model, (xs,), EXACT, dry_run=True)
    assert [(r.site, r.status) for r in report.records] == [("stem.0", "planned"), ("gate.conv", "planned"),
                                                             ("head", "planned")]
    assert report.title.startswith("fxrewrite plan (dry run")
    assert type(new.stem) is nn.Sequential and new is not model


def test_a_model_that_fails_on_its_inputs_is_a_config_error(seeded: None) -> None:
    with pytest.raises(ConfigError, match=r"raised RuntimeError.*Check the example inputs"):
        rewrite_partial(PerImage().eval(), ([torch.randn(4, 8, 8)],), EXACT)  # 4 channels, not 3
    with pytest.raises(TraceFailure, match=r"expected a torch\.nn\.Module"):
        rewrite_partial(lambda x: x, (torch.randn(1),), EXACT)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="invalid pipeline"):
        rewrite_partial(PerImage(), (images(),), "depthwise-separable{rank=0}")


# ---------------------------------------------------------------------------------------------- detectors


# The detectors are built as torchvision's fasterrcnn_resnet50_fpn / retinanet_resnet50_fpn build them, with random
# weights, on a ResNet-18 FPN instead of a ResNet-50 one (which triples the test time), 96x96 images and few proposals.


def faster_rcnn() -> nn.Module:
    backbone = _resnet_fpn_extractor(resnet18(), 5)
    return detection.FasterRCNN(backbone, num_classes=5, min_size=96, max_size=96, rpn_pre_nms_top_n_test=50,
                                rpn_post_nms_top_n_test=20, box_detections_per_img=10)


def retinanet() -> nn.Module:
    backbone = _resnet_fpn_extractor(resnet18(), 5, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return detection.RetinaNet(backbone, num_classes=5, min_size=96, max_size=96, topk_candidates=20,
                               detections_per_img=10)


DETECTORS = {
    # builder, submodules left eager (besides the model itself), convs outside the backbone that are rewritten
    "faster_rcnn": (faster_rcnn, ["rpn", "rpn.head"], ["rpn.head.conv.0.0"]),
    "retinanet": (retinanet, ["head", "head.classification_head", "head.regression_head"],
                  [f"head.{h}_head.conv.{i}.0" for h in ("classification", "regression") for i in range(4)]
                  + ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]),
}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_backbone_is_rewritten_and_the_detector_runs(name: str) -> None:
    torch.manual_seed(0)
    build, eager, head_sites = DETECTORS[name]
    model = build().eval()
    assert is_image_list_model(model)
    xs = [torch.rand(3, 96, 96)]
    before = snapshot(model)
    new, report, left_alone = rewrite_partial(model, (xs,), EXACT, verify="shapes")
    assert_unchanged(before, model)
    assert [e.qualname for e in left_alone] == ["", *eager]
    assert all("list" in e.reason or "ImageList" in e.reason for e in left_alone)
    # every non-1x1 conv of the backbone (counted from the model itself), and the head convs listed above
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("backbone.")
                and m.kernel_size != (1, 1)]
    assert len(expected) >= 20
    assert sorted(rewritten(report)) == sorted(expected + head_sites)
    skipped = {r.code for r in report.records if r.status == "skipped"}
    assert skipped == {"pointwise-kernel"}
    assert isinstance(new.backbone, torch.fx.GraphModule)
    assert type(new.backbone.get_submodule("body.layer1.0.conv2")) is nn.Sequential  # depthwise + pointwise
    batch = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        got, want = new.backbone(batch), model.backbone(batch)
        assert list(got) == list(want)
        for key in want:
            err = (got[key] - want[key]).norm() / want[key].norm()
            assert err < 1e-4, (key, float(err))
        out, ref = new(xs), model(xs)
    assert len(out) == 1 and set(out[0]) == set(ref[0]) == {"boxes", "labels", "scores"}
    assert out[0]["boxes"].shape[1] == 4 and out[0]["boxes"].dtype == ref[0]["boxes"].dtype


# -------------------------------------------------------------------------------- model specs and inputs


def test_detection_spec_form_and_image_list_inputs() -> None:
    model = load_model("torchvision.detection:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert type(model).__name__ == "FasterRCNN" and not model.training
    inputs = example_inputs(model, [(2, 3, 64, 64)])
    assert len(inputs) == 1 and [tuple(i.shape) for i in inputs[0]] == [(3, 64, 64), (3, 64, 64)]
    assert load_model("torchvision.segmentation:lraspp_mobilenet_v3_large").__class__.__name__ == "LRASPP"
    with pytest.raises(ModelLoadError, match=r"no model 'resnet18' in family 'detection'; closest"):
        load_model("torchvision.detection:resnet18")
    with pytest.raises(ModelLoadError, match="unknown torchvision model family 'detections'"):
        load_model("torchvision.detections:ssd300_vgg16")


# --------------------------------------------------------------------- wiring into the API and the CLI


def test_rewrite_with_partial_true(seeded: None) -> None:
    model = PerImage().eval()
    result = fxrewrite.rewrite(model, (images(),), EXACT, partial=True)
    assert rewritten(result.report) == ["stem.0", "gate.conv", "head"]
    assert result.verification is result.report.verification and result.ok


def test_cli_partial_flag(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fxrewrite.frontends.cli import main
    kwargs = '{"min_size": 96, "max_size": 96, "rpn_pre_nms_top_n_test": 20, "rpn_post_nms_top_n_test": 10}'
    code = main(["plan", "torchvision.detection:fasterrcnn_mobilenet_v3_large_320_fpn", "--partial",
                 "--model-kwargs", kwargs, "--input-shape", "1,3,96,96", "--pass", EXACT, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    records = json.loads(out)["plan"]["records"]
    assert any(r["site"].startswith("backbone.body.") and r["status"] == "planned" for r in records)


def test_left_alone_entries_are_tuples() -> None:
    entry = LeftAlone("rpn", "takes an ImageList argument")
    qualname, reason = entry
    assert (qualname, reason) == ("rpn", "takes an ImageList argument") and entry.qualname == "rpn"
