"""rewrite(..., calibration=...) repairs as part of the rewrite; the CLI takes --calibration FILE."""

from __future__ import annotations

import torch
from torch import nn

import fxrewrite
from fxrewrite.frontends.cli import main


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()


def test_calibration_reduces_output_error_and_is_reported() -> None:
    model = _model()
    x = torch.randn(4, 3, 12, 12)
    data = [(torch.randn(8, 3, 12, 12),) for _ in range(4)]
    plain = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}")
    repaired = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}", calibration=data)
    assert plain.repair is None and repaired.repair is not None
    with torch.no_grad():
        ref = model(x)
        err_plain = ((plain.module(x) - ref).norm() / ref.norm()).item()
        err_repaired = ((repaired.module(x) - ref).norm() / ref.norm()).item()
    assert err_repaired < err_plain
    assert "repair" in str(repaired.report)
    assert any("repair" in heading for heading in repaired.report.to_dict()["sections"])


def test_cli_calibration_file(tmp_path, capsys) -> None:
    model_file = tmp_path / "calib.pt"
    torch.save(torch.randn(16, 3, 32, 32), model_file)
    code = main(["rewrite", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--pass",
                 "depthwise-separable{rank=1}", "--select", "layer4.*", "--calibration", str(model_file),
                 "--calibration-batch-size", "8"])
    assert code == 0
    assert "repair" in capsys.readouterr().out
    assert main(["rewrite", "torchvision:resnet18", "--calibration", str(tmp_path / "missing.pt")]) == 2
