"""Model specs beyond torchvision and factories, through the CLI (``frontends.cli.main``): ``timm:NAME``, ``.pt2``
programs, state_dict / safetensors files with ``--arch``, and the refusal of full pickles without ``--unsafe-load``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import models
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import fxrewrite
from fxrewrite.frontends.cli import EXIT_MODEL, EXIT_OK, EXIT_USAGE, main
from fxrewrite.frontends.models import pickled_classes, resolve_model

EXACT = "depthwise-separable{rank=exact}"
TOL = {"atol": 1e-4, "rtol": 1e-4}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def spatial_convs(model: nn.Module) -> list[str]:
    """Conv2d modules with a kernel larger than 1x1 that are not depthwise: what depthwise-separable{rank=exact}
    rewrites."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
            and m.groups != m.in_channels]


def statuses(report: dict) -> dict[str, str]:
    return {r["site"]: r["status"] for r in report["records"]}


# ---------------------------------------------------------------------------------------------------------------
# timm:NAME


def test_timm_model_plans_and_rewrites_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    timm = pytest.importorskip("timm")
    reference = timm.create_model("resnet18", pretrained=False, num_classes=10)
    expected = spatial_convs(reference)
    assert len(expected) == 17  # the 7x7 stem and 16 3x3 convs
    spec = ["timm:resnet18", "--model-kwargs", '{"num_classes": 10}', "--input-shape", "1,3,32,32", "--pass", EXACT,
            "--json"]
    code, out, err = run(["plan", *spec], capsys)
    assert code == EXIT_OK, err
    assert [s for s, st in statuses(json.loads(out)["plan"]).items() if st == "planned"] == expected
    code, out, err = run(["verify", *spec], capsys)
    assert code == EXIT_OK, err  # verify gates exact rewrites at float level
    doc = json.loads(out)
    assert [s for s, st in statuses(doc).items() if st == "rewritten"] == expected
    assert doc["costs"]["params_before"] == sum(p.numel() for p in reference.parameters())  # num_classes=10 reached


@pytest.mark.parametrize(("argv", "message"), [
    (["plan", "timm:resnet19"], "timm has no model 'resnet19'; closest: "),
    (["plan", "timm:resnet18", "--model-kwargs", '{"pretrained": true}'], "pretrained weights cannot be downloaded"),
])
def test_timm_spec_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    code, out, err = run(argv, capsys)
    assert (code, out) == (EXIT_MODEL, "")
    assert message in err


def test_timm_missing_says_pip_install(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    code, _out, err = run(["plan", "timm:resnet18"], capsys)
    assert code == EXIT_MODEL
    assert "`pip install timm`" in err


# ---------------------------------------------------------------------------------------------------------------
# .pt2 programs


def exported_file(tmp_path: Path, dynamic_batch: bool = False) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = models.Residual().eval()
    x = models.example_input(model)
    dynamic = {"x": {0: torch.export.Dim("batch", min=1, max=64)}} if dynamic_batch else None
    path = tmp_path / "residual.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dynamic), str(path))
    return model, path


def test_pt2_plan_rewrite_and_output_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, path = exported_file(tmp_path)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    code, out, err = run(["plan", str(path), "--json"], capsys)  # input shapes from the program
    assert code == EXIT_OK, err
    doc = json.loads(out)
    assert [s["name"] for s in doc["sites"]] == convs
    assert doc["sites"][0]["output_shape"] == [2, 16, 16, 16]
    out_file = tmp_path / "rewritten.pt2"
    code, out, err = run(["rewrite", str(path), "--pass", EXACT, "--output", str(out_file), "--json"], capsys)
    assert code == EXIT_OK, err
    expected = spatial_convs(model)
    assert expected == ["stem", "body.0", "body.2", "grouped"]
    assert [s for s, st in statuses(json.loads(out)).items() if st == "rewritten"] == expected
    rewritten = torch.export.load(str(out_file))
    convs_after = [n for n in rewritten.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs_after) == len(convs) + len(expected)  # each rewritten site: a depthwise and a pointwise conv
    x = torch.randn(2, 8, 16, 16)
    torch.testing.assert_close(rewritten.module()(x), model(x), **TOL)


def test_pt2_dynamic_shapes_need_input_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model, path = exported_file(tmp_path, dynamic_batch=True)
    code, _out, err = run(["plan", str(path)], capsys)
    assert code == EXIT_USAGE
    assert "input 0 of the program has a dynamic shape" in err and "--input-shape" in err
    code, out, err = run(["plan", str(path), "--input-shape", "3,8,16,16", "--json"], capsys)
    assert code == EXIT_OK, err
    assert json.loads(out)["sites"][0]["output_shape"] == [3, 16, 16, 16]


@pytest.mark.parametrize(("extra", "message"), [
    (["--input-shape", "2,8,16,16", "--input-shape", "2,8,16,16"], "takes 1 tensor input(s); 2 input shape(s)"),
    (["--dtype", "float64"], "the program takes torch.float32 inputs, not torch.float64"),
    (["--leaf-module", "body", "--partial"], "--leaf-module, --partial: not for a .pt2 program"),
    (["--arch", "torchvision:resnet18"], "holds its architecture"),
])
def test_pt2_usage_errors(extra: list[str], message: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    _model, path = exported_file(tmp_path)
    code, out, err = run(["plan", str(path), *extra], capsys)
    assert (code, out) == (EXIT_USAGE, "")
    assert message in err


# ---------------------------------------------------------------------------------------------------------------
# state_dict and safetensors files with --arch


def test_state_dict_round_trip_resnet18(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Weights of a trained-looking resnet18 -> rewrite (rank=exact) -> safetensors + plan -> equals that resnet18."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    for m in original.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    weights = tmp_path / "r18.pt"
    torch.save(original.state_dict(), weights)
    out_file = tmp_path / "r18_dws.safetensors"
    code, out, err = run(["rewrite", str(weights), "--arch", "torchvision:resnet18", "--model-kwargs",
                          '{"num_classes": 10}', "--input-shape", "2,3,32,32", "--pass", EXACT, "--output",
                          str(out_file), "--json"], capsys)
    assert code == EXIT_OK, err
    assert sum(st == "rewritten" for st in statuses(json.loads(out)).values()) == len(spatial_convs(original))
    rebuilt = fxrewrite.load_rewritten(torchvision.models.resnet18(weights=None, num_classes=10), out_file).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x), **TOL)


@pytest.mark.parametrize(("name", "wrap"), [
    ("plain.pt", lambda sd: sd),
    ("checkpoint.pth", lambda sd: {"state_dict": sd, "epoch": 3}),
    ("checkpoint.ckpt", lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}),
    ("weights.safetensors", None),
])
def test_state_dict_files_load_the_weights(name: str, wrap, tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = models.Plain().eval()
    original.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path / name
    if wrap is None:
        save_file(original.state_dict(), str(path))
    else:
        torch.save(wrap(original.state_dict()), path)
    loaded = resolve_model(str(path), arch="models:Plain")
    assert loaded is not original and not loaded.training
    x = models.example_input(original)
    torch.testing.assert_close(loaded(x), original(x), atol=0, rtol=0)


def test_state_dict_mismatch_names_keys_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = models.Plain().state_dict()
    del state["conv2.weight"], state["conv2.bias"], state["pw.bias"]
    state["head.weight"] = torch.zeros(3)
    state["dw.weight"] = torch.zeros(16, 1, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    code, out, err = run(["plan", str(path), "--arch", "models:Plain", "--input-shape", "1,3,8,8"], capsys)
    assert (code, out) == (EXIT_MODEL, "")
    assert "bad.pt does not fit Plain: 3 missing keys: conv2.weight, conv2.bias, pw.bias" in err
    assert "1 unexpected key: head.weight" in err
    assert "1 wrongly shaped tensor: dw.weight (16x1x3x3 in the file, 32x1x3x3 in the model)" in err
    assert "Check --arch and --model-kwargs" in err


def test_state_dict_spec_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.safetensors"
    save_file(models.Plain().state_dict(), str(path))
    code, _out, err = run(["plan", str(path)], capsys)
    assert code == EXIT_USAGE
    assert f"w.safetensors holds a state_dict ({len(models.Plain().state_dict())} tensors) but no architecture: " \
           "add --arch SPEC" in err
    code, _out, err = run(["plan", "models:Plain", "--arch", "torchvision:resnet18"], capsys)
    assert code == EXIT_USAGE and "--arch is for a state_dict file" in err


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.pt", None, "no such model file"),
    ("garbage.pt", b"not a torch file", "cannot read garbage.pt with torch.load"),
    ("garbage.safetensors", b"not safetensors", "cannot read garbage.safetensors as safetensors"),
    ("list.pt", [torch.zeros(2)], "list.pt holds a list, not a state_dict"),
    ("model.onnx", b"", "cannot tell the format of model file 'model.onnx'"),
])
def test_unreadable_model_files(name: str, content, message: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    code, out, err = run(["plan", str(path), "--arch", "models:Plain"], capsys)
    assert (code, out) == (EXIT_MODEL, "")
    assert message in err


# ---------------------------------------------------------------------------------------------------------------
# full pickles: refused unless --unsafe-load


class WritesAFile:
    """Unpickling this calls open(marker, "w"): proof of whether a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_full_pickle_is_refused_without_running_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": WritesAFile(marker)}, path)
    code, out, err = run(["plan", str(path), "--arch", "models:Plain"], capsys)
    assert (code, out) == (EXIT_MODEL, "")
    assert "it names io.open" in err and "runs arbitrary code" in err
    assert not marker.exists()


def test_pickled_module_refusal_message_and_unsafe_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    original = models.Plain().eval()
    path = tmp_path / "whole.pt"
    torch.save(original, path)
    assert pickled_classes(path) == ["models.Plain", "torch.nn.modules.conv.Conv2d",
                                     "torch.nn.modules.batchnorm.BatchNorm2d"]
    argv = ["rewrite", str(path), "--input-shape", "2,3,16,16", "--pass", EXACT]
    code, out, err = run(argv, capsys)
    assert (code, out) == (EXIT_MODEL, "")
    assert err.startswith("fxrewrite: error: refusing to load whole.pt: it is a pickled module")
    for part in ("models.Plain", "unpickling it runs arbitrary code", "--unsafe-load", "only for a file you trust",
                 "torch.save(model.state_dict(), PATH)", "--arch SPEC"):
        assert part in err
    out_file = tmp_path / "out.pt2"
    code, _out, err = run([*argv, "--unsafe-load", "--output", str(out_file)], capsys)
    assert code == EXIT_OK, err
    x = models.example_input(original)
    torch.testing.assert_close(torch.export.load(str(out_file)).module()(x), original(x), **TOL)
    code, _out, err = run([*argv, "--unsafe-load", "--arch", "models:Plain"], capsys)
    assert code == EXIT_USAGE and "holds a whole Plain module: drop --arch" in err


def test_unsafe_load_checkpoint_with_a_module(tmp_path: Path) -> None:
    original = models.Residual().eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": original, "epoch": 1}, path)
    loaded = resolve_model(str(path), unsafe_load=True)
    x = models.example_input(original)
    torch.testing.assert_close(loaded(x), original(x), atol=0, rtol=0)
