"""User mistakes and bad data get a ConfigError (CLI exit 2) with one true sentence, before any expensive work; the
input model is never changed and nothing is written (issue 17)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError


def _nan_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight[1, 2, 0, 1] = float("nan")
    return model


@pytest.mark.parametrize("options", [
    {"passes": "grouped{groups=2}"},
    {"passes": "depthwise-separable"},
    {"passes": "depthwise-bottleneck{rank=2}"},
    {"target": fxrewrite.Target(macs=0.5)},
], ids=["grouped", "depthwise-separable", "bottleneck", "target"])
def test_a_nan_weight_is_a_config_error_naming_the_site_and_count(options: dict) -> None:
    model = _nan_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"site '2': weight has 1 non-finite value \(NaN or inf\) of 576"):
        fxrewrite.rewrite(model, (torch.randn(1, 3, 8, 8),), **options)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_a_nan_weight_outside_the_selection_is_not_an_error() -> None:
    result = fxrewrite.rewrite(_nan_model(), (torch.randn(1, 3, 8, 8),), passes="depthwise-separable{rank=exact}",
                               select="0")
    assert [r.status for r in result.report.records if r.site == "0"] == ["rewritten"]


def test_a_nan_weight_no_pass_reads_is_left_to_the_verification() -> None:
    """A separable pass skips a 1x1 conv (its kind refuses it whatever the options), so its weight is not scanned:
    the rewrite goes on and the verification reports the original model's non-finite output; a grouped pass
    factorises the same 1x1 conv, so there the NaN is a configuration error before any work."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    with torch.no_grad():
        model[2].weight[1, 2, 0, 0] = float("nan")
    x = torch.randn(1, 3, 8, 8)
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}")
    assert [(r.site, r.status) for r in result.report.records] == [("0", "rewritten"), ("2", "skipped")]
    assert not result.ok and "the original model's output has" in result.verification.failures[0]
    with pytest.raises(ConfigError, match=r"site '2': weight has 1 non-finite value \(NaN or inf\) of 64"):
        fxrewrite.rewrite(model, (x,), passes="grouped{groups=2}")


def test_the_site_listing_of_a_nan_model_still_works() -> None:
    """A dry run without passes only lists sites: nothing is factorised, so a NaN weight is no reason to refuse."""
    plan = fxrewrite.plan(_nan_model(), (torch.randn(1, 3, 8, 8),))
    assert [s.name for s in plan.sites] == ["0", "2"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()


def test_one_input_too_many_is_a_config_error() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"^Sequential.forward takes 1 input \(input\), got 2$"):
        fxrewrite.rewrite(_model(), (x, torch.randn(7, 7)), passes="grouped{groups=2}")
    with pytest.raises(ConfigError, match=r"takes 1 input \(input\), got 0"):
        fxrewrite.plan(_model(), (), passes="grouped{groups=2}")


def test_an_optional_forward_argument_may_be_given_or_not() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.conv(x) * scale

    x = torch.randn(1, 3, 8, 8)
    assert fxrewrite.rewrite(TwoInputs(), (x,), passes="grouped{groups=2}", verify=False).module is not None
    with pytest.raises(ConfigError, match=r"takes 1 to 2 inputs \(x, scale\), got 3"):
        fxrewrite.rewrite(TwoInputs(), (x, 1.0, 2.0), passes="grouped{groups=2}")


@pytest.mark.parametrize("options", [
    {"passes": "depthwise-separable{rank=1}"},
    {"target": fxrewrite.Target(macs=0.5)},
], ids=["repair", "calibrated-budget"])
def test_calibration_of_the_wrong_shape_is_a_config_error_before_any_fit(options: dict) -> None:
    x = torch.randn(1, 3, 16, 16)
    batches = [(torch.randn(4, 3, 16, 16),), (torch.randn(4, 1, 16, 16),)]
    with pytest.raises(ConfigError, match=r"^calibration batch 1, input 0 has shape \(4,1,16,16\); the model takes "
                                          r"\(N,3,H,W\) like its example input \(1,3,16,16\)$"):
        fxrewrite.rewrite(_model(), (x,), calibration=batches, **options)


def test_non_finite_calibration_data_is_named() -> None:
    bad = torch.randn(4, 3, 16, 16)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ConfigError, match=r"calibration batch 0, input 0 has 1 non-finite value"):
        fxrewrite.rewrite(_model(), (torch.randn(1, 3, 16, 16),), passes="depthwise-separable{rank=1}",
                          calibration=[(bad,)])


# ---------------------------------------------------------------------------------------------------------- the CLI

RESNET = ["torchvision:resnet18", "--input-shape", "1,3,32,32"]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from fxrewrite.frontends.cli import main
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _calibration_file(folder, shape: tuple[int, ...]) -> str:  # type: ignore[no-untyped-def]
    path = folder / "calibration.pt"
    torch.save(torch.randn(*shape), path)
    return str(path)


BAD_CLI = [  # (name, argv with {tmp} for the scratch folder, exit code, start of the first stderr line)
    ("output-folder-missing", ["rewrite", *RESNET, "--pass", "grouped{groups=2}", "--output", "{tmp}/no/m.pt2"], 2,
     "fxrewrite: error: cannot write {tmp}/no/m.pt2: folder {tmp}/no does not exist"),
    ("output-is-a-folder", ["rewrite", *RESNET, "--pass", "grouped{groups=2}", "--output", "{tmp}/dir.pt2"], 2,
     "fxrewrite: error: cannot write {tmp}/dir.pt2: it is a folder"),
    ("output-unknown-format", ["rewrite", *RESNET, "--pass", "grouped{groups=2}", "--output", "{tmp}/m.pkl"], 2,
     "fxrewrite: error: --output {tmp}/m.pkl: unknown format '.pkl'"),
    ("report-folder-missing", ["rewrite", *RESNET, "--pass", "grouped{groups=2}", "--report", "{tmp}/no/r.md"], 2,
     "fxrewrite: error: cannot write {tmp}/no/r.md: folder {tmp}/no does not exist"),
    ("budget-plan-folder-missing", ["rewrite", *RESNET, "--target-macs", "0.5", "--budget-plan", "{tmp}/no/p.json"],
     2, "fxrewrite: error: cannot write {tmp}/no/p.json: folder {tmp}/no does not exist"),
    ("one-input-too-many", ["rewrite", *RESNET, "--input-shape", "7,7", "--pass", "grouped{groups=2}"], 2,
     "fxrewrite: error: ResNet.forward takes 1 input (x), got 2"),
    ("calibration-wrong-channels", ["rewrite", *RESNET, "--pass", "depthwise-separable{rank=1}", "--calibration",
                                    "{calibration}"], 2,
     "fxrewrite: error: calibration batch 0, input 0 has shape (4,1,32,32); the model takes (N,3,H,W)"),
    ("calibration-wrong-channels-target", ["rewrite", *RESNET, "--target-macs", "0.5", "--calibration",
                                           "{calibration}"], 2,
     "fxrewrite: error: calibration batch 0, input 0 has shape (4,1,32,32)"),
    ("not-a-pt2", ["plan", "{tmp}/fake.pt2"], 4, "fxrewrite: error: torch.export.load('fake.pt2') failed"),
    ("bad-pass-option", ["rewrite", *RESNET, "--pass", "grouped{groups=0}"], 2, "fxrewrite: error: "),
]


@pytest.mark.parametrize(("name", "argv", "code", "first"), BAD_CLI, ids=[c[0] for c in BAD_CLI])
def test_bad_cli_input_is_exit_2_or_4_with_one_line_and_writes_nothing(
        name: str, argv: list[str], code: int, first: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dir.pt2").mkdir()
    (tmp_path / "fake.pt2").write_text("not a program")
    calibration = _calibration_file(tmp_path, (4, 1, 32, 32))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{calibration}", calibration)

    got, _out, err = _cli([fill(a) for a in argv], capsys)
    assert got == code, err
    lines = err.strip().splitlines()
    assert lines[0].startswith(fill(first)), lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "something was written"
    if name == "not-a-pt2":
        assert len(lines) == 1, f"torch's log leaked into stderr:\n{err}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the check cannot fail as root")
def test_a_read_only_output_folder_is_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    code, _out, err = _cli(["rewrite", *RESNET, "--pass", "grouped{groups=2}", "--output", f"{folder}/m.pt2"], capsys)
    assert code == 2 and "is not writable" in err


def test_a_failed_gate_says_the_model_was_not_written(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.safetensors"
    code, _out, err = _cli(["verify", *RESNET, "--pass", "depthwise-separable{rank=1}", "--rtol", "1e-9",
                            "--output", str(out)], capsys)
    assert code == 1
    assert f"fxrewrite: not writing {out}: the verification gate failed" in err
    assert not out.exists()


def test_two_identical_runs_give_identical_json_reports_timings_aside(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["rewrite", *RESNET, "--pass", "depthwise-separable{rank=1}", "--json"]
    reports = []
    for _ in range(2):
        code, out, _err = _cli(argv, capsys)
        assert code == 0
        doc = json.loads(out)
        doc["verification"].pop("timings_s")
        reports.append(doc)
    assert reports[0] == reports[1]
    _code, out, _err = _cli([*argv, "--seed", "1"], capsys)
    assert json.loads(out)["records"] != reports[0]["records"], "--seed does not change the random weights"


def test_plan_is_a_dry_run_without_real_input_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    """1 x 3 x 40000 x 40000 float32 is 19.2 GB: the plan needs the shapes only."""
    code, out, err = _cli(["plan", "torchvision:resnet18", "--input-shape", "1,3,40000,40000", "--pass",
                           "grouped{groups=2}", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    first = doc["sites"][0]
    assert first["output_shape"] == [1, 64, 20000, 20000]
    assert doc["plan"]["records"][0]["macs_before"] == 64 * 20000 * 20000 * 3 * 7 * 7


def test_non_finite_output_of_the_original_never_verifies_ok() -> None:
    """Finite weights, but a batch norm whose statistics are NaN: the original's output is NaN, so is the rewrite's;
    no figure may call that ok (before: rel L2 0, cosine 1, PASSED)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[1].running_var[3] = float("nan")
    result = fxrewrite.rewrite(model, (torch.randn(1, 3, 8, 8),), passes="grouped{groups=2}")
    assert result.verification is not None and not result.ok
    site = next(s for s in result.verification.sites if s.site == "2")
    assert site.status == "failed" and "the original conv's output has 512 non-finite value(s)" in site.reason
    output = result.verification.outputs[0]
    assert output.status == "failed" and "the original model's output has 512 non-finite value(s)" in output.reason
    assert output.error is not None and output.error.reference_nonfinite == 512


class _MixedConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.c3 = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.c1(x.flatten(2)).sum()
        b = self.c3(x.unsqueeze(2)).sum()
        return self.c2(x) + a + b


def test_1d_and_3d_convs_are_listed_with_a_reason_and_selecting_one_says_why() -> None:
    x = torch.randn(1, 3, 8, 8)
    result = fxrewrite.rewrite(_MixedConvs().eval(), (x,), passes="grouped{groups=2}", verify=False)
    assert [(h.name, h.reason.code) for h in result.report.not_visible] == [("c1", "not-conv2d"), ("c3", "not-conv2d")]
    assert "c1: not-conv2d: a Conv1d" in str(result.report)
    with pytest.raises(ConfigError, match=r"rule 'c1' matches no convolution site: c1 is not a site \(not-conv2d: a "
                                          r"Conv1d: fxrewrite rewrites 2-d convolutions"):
        fxrewrite.rewrite(_MixedConvs().eval(), (x,), passes="grouped{groups=2}", select="c1")


def test_the_summary_line_adds_up_with_a_conv_called_twice_and_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
            self.c.weight = self.b.weight
            self.d = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.d(self.c(self.b(self.a(self.a(x)))))

    report = fxrewrite.rewrite(Tied().eval(), (torch.randn(1, 4, 8, 8),), passes="grouped{groups=2}").report
    assert [(r.site, r.code or r.status) for r in report.records] == [
        ("a", "shared-module"), ("a", "shared-module"), ("b", "tied-weight"), ("c", "tied-weight"), ("d", "rewritten")]
    line = next(x for x in str(report).splitlines() if x.startswith("sites:"))
    assert line.startswith("sites: 4  changed: 1  skipped: 4  (5 records for 4 sites: a module called from several")
