"""fxrewrite.measure.latency: structure of the measurement (backends, medians, ratios, threads), never timing goals."""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest
import torch
from torch import nn

import fxrewrite
from fxrewrite.errors import ConfigError
from fxrewrite.measure.latency import measure_latency
from fxrewrite.report.schema import validate


def _pair() -> tuple[nn.Module, torch.fx.GraphModule, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = (torch.randn(1, 3, 16, 16),)
    return model, fxrewrite.rewrite(model, x, passes="depthwise-separable{rank=1}", verify=False).module, x


def _positive(ms: float | None) -> bool:
    return ms is not None and math.isfinite(ms) and ms > 0


def test_eager_and_channels_last_medians_and_ratios() -> None:
    model, new, x = _pair()
    threads_before = torch.get_num_threads()
    lat = measure_latency(model, new, x, runs=4, warmup=1, threads=1)
    assert [b.backend for b in lat.backends] == ["eager", "channels_last"]
    assert (lat.runs, lat.warmup, lat.threads, lat.device, lat.input_shapes) == (4, 1, 1, "cpu", ((1, 3, 16, 16),))
    assert torch.get_num_threads() == threads_before  # restored
    for b in lat.backends:
        assert b.status == "ok" and b.reason == ""
        assert _positive(b.original_ms) and _positive(b.rewritten_ms)
        assert b.ratio == b.rewritten_ms / b.original_ms
        assert b.original_min_ms <= b.original_ms and b.rewritten_min_ms <= b.rewritten_ms
    assert lat.sites == ()
    # the originals are neither converted to channels_last nor left in another mode
    assert model[0].weight.is_contiguous() and not model.training
    text = str(lat)
    assert "1 thread(s)" in text and "median of 4 timed runs after 1 warm-up" in text


def test_per_site_timing_covers_every_rewritten_site() -> None:
    model, new, x = _pair()
    lat = measure_latency(model, new, x, runs=2, warmup=0, backends=("eager",), per_site=True)
    assert [s.site for s in lat.sites] == ["0", "2"]
    for s in lat.sites:
        assert _positive(s.original_ms) and _positive(s.rewritten_ms)
        assert s.ratio == s.rewritten_ms / s.original_ms


def test_onnxruntime_backend_when_installed() -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, new, x = _pair()
    b = measure_latency(model, new, x, runs=2, warmup=1, backends=("onnxruntime",), threads=1).backend("onnxruntime")
    assert b.status == "ok", b.reason
    assert _positive(b.original_ms) and _positive(b.rewritten_ms) and b.ratio == b.rewritten_ms / b.original_ms


def test_onnxruntime_backend_is_skipped_with_a_reason_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def no_onnxruntime(name: str, *args: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_onnxruntime)
    model, new, x = _pair()
    lat = measure_latency(model, new, x, runs=1, warmup=0, backends=("eager", "onnxruntime"))
    skipped = lat.backend("onnxruntime")
    assert skipped.status == "skipped" and "onnxruntime is not installed" in skipped.reason
    assert skipped.original_ms is None and skipped.ratio is None
    assert lat.backend("eager").status == "ok"
    assert "skipped: onnxruntime is not installed" in str(lat)


def test_rewrite_attaches_latency_on_request_and_the_json_validates() -> None:
    model, _, x = _pair()
    result = fxrewrite.rewrite(model, x, passes="depthwise-separable{rank=1}",
                               latency={"runs": 2, "warmup": 0, "backends": ("eager",)})
    assert result.latency is result.report.latency and result.latency.runs == 2
    doc = result.report.to_dict()
    assert doc["latency"]["backends"][0]["backend"] == "eager"
    assert validate(doc) == []
    assert "== latency ==" in str(result.report)


def test_bad_requests_are_config_errors() -> None:
    model, new, x = _pair()
    with pytest.raises(ConfigError, match="unknown latency backend"):
        measure_latency(model, new, x, backends=("tensorrt",))
    with pytest.raises(ConfigError, match="runs must be >= 1"):
        measure_latency(model, new, x, runs=0)
    with pytest.raises(ConfigError, match="meta device"):
        measure_latency(nn.Conv2d(3, 3, 1).to("meta"), new, x)
