"""Tests for the command line (fxrewrite.frontends.cli.main): output, --json, exit codes, model specs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torchvision
from torch import nn

from fxrewrite.frontends.cli import EXIT_MODEL, EXIT_OK, EXIT_USAGE, main
from fxrewrite.passes import REGISTRY


def resnet18_conv_names() -> list[str]:
    """The qualified names of resnet18's Conv2d modules, counted independently of fxrewrite."""
    model = torchvision.models.resnet18(weights=None)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_plan_prints_the_site_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "torchvision:resnet18", "--input-shape", "1,3,224,224"]) == EXIT_OK
    out, err = capsys.readouterr()
    lines = out.splitlines()
    names = resnet18_conv_names()
    assert len(names) == 20
    rows = [line.split() for line in lines if line.split() and line.split()[0] in names]
    assert [r[0] for r in rows] == names  # one row per site, in graph order
    assert lines[-1].startswith("20 convolution site(s)")
    conv1 = rows[0]
    assert conv1[1:5] == ["3->64", "k7x7", "s2", "1x64x112x112"]
    assert conv1[-1] == "channels-not-divisible"  # grouped: no g > 1 divides 3 input channels
    downsample = next(r for r in rows if r[0] == "layer2.0.downsample.0")
    # 1x1: a depthwise split always costs more; a grouped 1x1 + 1x1 split at low rank saves
    assert downsample[-3:] == ["pointwise-kernel", "yes", "yes"]
    assert err == ""


def test_plan_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "torchvision:resnet18", "--input-shape", "1,3,64,64", "--json",
                 "--pass", "grouped{groups=4}"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["sites"]] == resnet18_conv_names()
    conv1 = doc["sites"][0]
    assert conv1["spec"]["kernel_size"] == [7, 7] and conv1["output_shape"] == [1, 64, 32, 32]
    records = doc["plan"]["records"]
    assert len(records) == 20
    by_site = {r["site"]: r for r in records}
    assert by_site["conv1"]["status"] == "skipped" and by_site["conv1"]["code"] == "channels-not-divisible"
    assert by_site["layer1.0.conv1"]["status"] == "planned"


def test_plan_with_select_and_zoo_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    # tests/ is on sys.path under pytest, so the zoo is importable as "models"
    assert main(["plan", "models:Residual", "--input-shape", "1,8,8,8", "--pass", "grouped{groups=2}",
                 "--select", "body.*", "--select", "!body.2", "--json"]) == EXIT_OK
    records = {r["site"]: r for r in json.loads(capsys.readouterr().out)["plan"]["records"]}
    assert records["body.0"]["status"] == "planned"
    assert records["body.2"]["code"] == "not-selected" and records["stem"]["code"] == "not-selected"


def test_drop_hooks_flag(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "models:HookedConv", "--input-shape", "1,4,8,8", "--pass", "depthwise-separable{rank=exact}",
            "--json"]
    for extra, status, dropped in (([], "skipped", None), (["--drop-hooks"], "planned", 1)):
        assert main(argv + extra) == EXIT_OK
        hooked = json.loads(capsys.readouterr().out)["plan"]["records"][0]
        assert (hooked["site"], hooked["status"], hooked["details"].get("dropped_hooks")) == ("hooked", status,
                                                                                             dropped)


def test_passes_lists_every_pass_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes"]) == EXIT_OK
    out = capsys.readouterr().out
    for name, cls in REGISTRY.items():
        opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        assert f"{name}{{{opts}}}" in out.splitlines()
        assert cls.description in out
    assert main(["passes", "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert sorted(p["name"] for p in doc["passes"]) == sorted(REGISTRY)
    for entry in doc["passes"]:
        assert list(entry["options"]) == [f.name for f in dataclasses.fields(REGISTRY[entry["name"]])]


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["plan", "models:Plain", "--input-shape", "1,3,8,8", "--pass", "groupd"], EXIT_USAGE, "unknown pass 'groupd'"),
    (["plan", "models:Plain", "--input-shape", "1,3,8,8", "--pass", "grouped{groupz=2}"], EXIT_USAGE,
     "unknown option 'groupz'; valid options: groups=4, init=block"),
    (["plan", "models:Plain", "--input-shape", "1,3,8,8", "--select", "conv9"], EXIT_USAGE,
     "rule 'conv9' matches no convolution site; closest: conv"),
    (["plan", "models:Plain", "--input-shape", "1,3,8,8", "--pass", "grouped", "--select", "conv9"], EXIT_USAGE,
     "matches no convolution site"),
    (["plan", "models:Plain", "--input-shape", "1,4,8,8"], EXIT_USAGE, "at node conv1"),
    (["plan", "models:Plain", "--input-shape", "1,a,8"], EXIT_USAGE, "input shape must be comma-separated"),
    (["plan", "models:Plain", "--model-kwargs", "{nope"], EXIT_USAGE, "--model-kwargs is not valid JSON"),
    (["plan", "models:Plain", "--leaf-module", "convv"], EXIT_USAGE, "'convv' names no submodule"),
    (["plan", "torchvision:resnet1"], EXIT_MODEL, "torchvision has no model 'resnet1'; closest: resnet18"),
    (["plan", "resnet18"], EXIT_MODEL, "did you mean 'torchvision:resnet18'"),
    (["plan", "no_such_module_xyz:f"], EXIT_MODEL, "cannot import 'no_such_module_xyz'"),
    (["plan", "models:NoSuchModel"], EXIT_MODEL, "has no attribute 'NoSuchModel'"),
    (["plan", "models:DataDependent", "--input-shape", "1,3,8,8"], EXIT_MODEL, "DATA-DEPENDENT-IF"),
    (["frobnicate"], EXIT_USAGE, "invalid choice"),
])
def test_exit_codes(argv: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


def test_untraceable_model_error_names_file_line_and_fix(capsys: pytest.CaptureFixture[str]) -> None:
    import models
    assert main(["plan", "models:DataDependent", "--input-shape", "1,3,8,8"]) == EXIT_MODEL
    err = capsys.readouterr().err
    assert f"models.py:{models.marker_line('DATA-DEPENDENT-IF')}" in err
    assert "fix:" in err and "torch says:" in err


def test_concrete_arg_and_leaf_module_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "models:FlagForward", "--input-shape", "1,3,8,8", "--concrete-arg", "use_second=false",
                 "--json"]) == EXIT_OK
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["sites"]] == ["first"]
    with pytest.warns(UserWarning, match="needs real values"):
        assert main(["plan", "models:SubmoduleDataDependent", "--input-shape", "1,3,8,8", "--leaf-module", "block",
                     "--json"]) == EXIT_OK
    assert [s["name"] for s in json.loads(capsys.readouterr().out)["sites"]] == ["stem", "head"]


def test_python_dash_m_fxrewrite_passes() -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "fxrewrite", "passes"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(line.split("{")[0] for line in proc.stdout.splitlines() if line and not line[0].isspace()) == sorted(
        REGISTRY)


def test_rewrite_writes_every_artifact_and_verify_gates(tmp_path, capsys):
    """--output/--report write each format atomically; `verify` with a tight rtol exits 1 and writes nothing."""
    from fxrewrite.frontends.cli import main

    args = ["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--pass", "grouped{groups=4}",
            "--select", "layer4.*"]
    outputs = [tmp_path / "m.pt2", tmp_path / "m.safetensors"]
    flags = [flag for p in outputs for flag in ("--output", str(p))]
    code = main([*args, *flags, "--report", str(tmp_path / "r.md")])
    assert code == 0
    assert all(p.exists() for p in outputs)
    assert (tmp_path / "m.plan.json").exists() and (tmp_path / "r.md").read_text().startswith("## ")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    capsys.readouterr()
    gated = tmp_path / "gated.pt2"
    code = main(["verify", *args[1:], "--rtol", "1e-6", "--output", str(gated)])
    assert code == 1
    assert not gated.exists()
    assert "layer4" in capsys.readouterr().out
