"""Tests for fxrewrite.io.artifacts: atomic writes (under injected failures), the formats and their checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.errors import ArtifactError, ConfigError, VerificationFailure
from fxrewrite.io.artifacts import onnxruntime_outputs, save
from fxrewrite.io.replay import plan_path_for
from fxrewrite.util.files import atomic_dir, atomic_path, atomic_write_text


class Injected(RuntimeError):
    """The failure the tests inject."""


def _small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    return model, torch.randn(2, 3, 10, 10)


@pytest.fixture(scope="module")
def result() -> tuple[fxrewrite.RewriteResult, torch.Tensor]:
    model, x = _small()
    return fxrewrite.rewrite(model, (x,), passes="grouped{groups=4}", verify=False), x


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- atomic helpers ---------------------------------------------------------------------------------------------


def test_atomic_path_failure_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    with pytest.raises(Injected), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise Injected
    assert _listing(tmp_path) == []
    atomic_write_text(target, "old")
    with pytest.raises(Injected), atomic_path(target) as tmp:
        tmp.write_text("new but partial")
        raise Injected
    assert _listing(tmp_path) == ["a.txt"] and target.read_text() == "old"


def test_atomic_files_get_the_usual_permissions(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE((tmp_path / "atomic.txt").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_atomic_dir_moves_side_files_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(Injected), atomic_dir(target) as d:
        (d / "m.onnx").write_text("graph")
        (d / "m.onnx.data").write_text("weights")
        raise Injected
    assert _listing(tmp_path) == []
    with atomic_dir(target) as d:
        (d / "m.onnx").write_text("graph")
        (d / "m.onnx.data").write_text("weights")
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    with pytest.raises(ArtifactError, match="nothing was written"), atomic_dir(tmp_path / "other.onnx"):
        pass
    assert _listing(tmp_path) == ["m.onnx", "m.onnx.data"]


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "such" / "file.md", "x")


# --- formats ----------------------------------------------------------------------------------------------------


def test_pt2_round_trip_and_injected_failure(result, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res, x = result
    saved = save(res, tmp_path / "model.pt2", (x,))
    assert saved.paths == (tmp_path / "model.pt2",) and saved.max_abs_diff == 0.0
    loaded = torch.export.load(tmp_path / "model.pt2")
    torch.testing.assert_close(loaded.module()(x), res.module(x), rtol=0, atol=0)
    before = (tmp_path / "model.pt2").read_bytes()

    real_save = torch.export.save

    def failing_save(ep, f, **kwargs):  # writes a partial archive, then fails
        real_save(ep, f, **kwargs)
        f.write(b"garbage")
        raise Injected("disk full")

    monkeypatch.setattr(torch.export, "save", failing_save)
    with pytest.raises(Injected):
        save(res, tmp_path / "model.pt2", (x,))
    with pytest.raises(Injected):
        save(res, tmp_path / "new.pt2", (x,))
    assert _listing(tmp_path) == ["model.pt2"] and (tmp_path / "model.pt2").read_bytes() == before


def test_failed_verification_writes_nothing(result, tmp_path: Path) -> None:
    res, x = result
    with pytest.raises(VerificationFailure, match="nothing was written"):
        save(res, tmp_path / "model.pt2", (x,), atol=-1.0, rtol=0.0)  # an impossible tolerance
    assert _listing(tmp_path) == []


def test_onnx_round_trip_with_onnxruntime(result, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    res, x = result
    saved = save(res, tmp_path / "model.onnx", (x,))
    assert saved.paths[0] == tmp_path / "model.onnx" and saved.notes == ()
    assert _listing(tmp_path) == sorted(p.name for p in saved.paths)
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= 1e-5
    got = onnxruntime_outputs(tmp_path / "model.onnx", (x,))
    torch.testing.assert_close(torch.from_numpy(got[0]), res.module(x).detach(), rtol=1e-5, atol=1e-5)
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    groups = sorted(next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node
                    if n.op_type == "Conv")
    assert groups == sorted(m.groups for m in res.module.modules() if isinstance(m, nn.Conv2d)) == [1, 4]


def test_onnx_injected_failure_leaves_nothing(result, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res, x = result

    def failing_export(model, args, f, **kwargs):  # leaves a partial graph and data file, then fails
        Path(f).write_text("partial")
        Path(str(f) + ".data").write_text("partial")
        raise Injected("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.warns(UserWarning, match="fell back"), pytest.raises(ArtifactError, match="both exporters"):
        save(res, tmp_path / "model.onnx", (x,))
    assert _listing(tmp_path) == []


def test_onnx_falls_back_to_the_legacy_exporter(result, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    res, x = result
    real_export = torch.onnx.export
    calls: list[bool] = []

    def dynamo_fails(model, args, f, **kwargs):
        calls.append(kwargs.get("dynamo", True))
        if kwargs.get("dynamo", True):
            raise Injected("unsupported operator")
        return real_export(model, args, f, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with pytest.warns(UserWarning, match="legacy"):
        saved = save(res, tmp_path / "model.onnx", (x,))
    assert calls == [True, False]
    assert any("legacy TorchScript exporter" in n and "unsupported operator" in n for n in saved.notes)
    assert saved.max_abs_diff is not None and saved.max_abs_diff <= 1e-5
    assert _listing(tmp_path) == sorted(p.name for p in saved.paths)


def test_safetensors_writes_weights_and_plan_together(result, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    res, _ = result
    real_replace = os.replace

    def fail_on_plan(src, dst):  # the weights are already in place when the plan's move fails
        if str(dst).endswith(".plan.json"):
            raise Injected("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_plan)
    with pytest.raises(Injected):
        save(res, tmp_path / "model.safetensors")
    assert _listing(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)
    saved = save(res, tmp_path / "model.safetensors")
    assert saved.paths == (tmp_path / "model.safetensors", plan_path_for(tmp_path / "model.safetensors"))
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    state = res.module.state_dict()
    assert sorted(tensors) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)


def test_safetensors_of_tied_weights(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    save(model, tmp_path / "tied.safetensors")
    from safetensors.torch import load_file
    loaded = load_file(str(tmp_path / "tied.safetensors"))
    torch.testing.assert_close(loaded["1.weight"], model[0].weight.detach(), rtol=0, atol=0)


def test_safetensors_of_a_rewritten_module_needs_its_plan(result, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    res, _ = result
    with pytest.raises(ConfigError, match="replay plan"):
        save(res.module, tmp_path / "model.safetensors")
    assert _listing(tmp_path) == []


def test_report_files(result, tmp_path: Path) -> None:
    res, _ = result
    save(res, tmp_path / "report.md")
    assert (tmp_path / "report.md").read_text() == res.report.to_markdown()
    save(res.report, tmp_path / "report.json")
    assert (tmp_path / "report.json").read_text() == res.report.to_json() + "\n"


def test_bad_requests_are_config_errors(result, tmp_path: Path) -> None:
    res, x = result
    with pytest.raises(ConfigError, match=r"\.pt2, \.onnx"):
        save(res, tmp_path / "model.bin", (x,))
    with pytest.raises(ConfigError, match="example_inputs"):
        save(res, tmp_path / "model.pt2")
    with pytest.raises(ConfigError, match=r"\(x,\)"):
        save(res, tmp_path / "model.pt2", x)
    with pytest.raises(ConfigError, match="report"):
        save(res.module, tmp_path / "report.md")
    with pytest.raises(ConfigError, match="no model"):
        save(res.report, tmp_path / "model.pt2", (x,))
    assert _listing(tmp_path) == []
