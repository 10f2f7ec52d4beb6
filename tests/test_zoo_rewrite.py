"""Every torchvision classification model: depthwise-separable{rank=exact} over all eligible sites reproduces the
model, and rank=1 runs, keeps shapes and reduces MACs.

Random weights (weights=None), eval mode, float64 for the exactness check so deep nets compare with
``torch.testing.assert_close`` defaults; float32 for the rank=1 check. Inputs are the smallest the model accepts
cheaply. Two models are excluded from the numeric checks, each with its reason in ``EXCLUDED``; they are still
rewritten on the meta device (no weights in memory) with ``init=random``, so every model runs through the pass.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import fxrewrite

pytestmark = pytest.mark.slow

MODELS = torchvision.models.list_models(module=torchvision.models)

EXCLUDED = {
    "regnet_y_128gf": "644M parameters: 5.2 GB per float64 copy and three copies during the check (model, "
                      "traced copy, rewritten weights) - over the memory of a shared CI box; its RegNetY blocks are "
                      "covered by the six smaller regnet_y_* models",
    "vit_h_14": "632M parameters: 5 GB per float64 copy, 15 GB peak, ~60 s on 2 cores; its only conv site "
                "(conv_proj, 14x14 stride 14) is the same kind as those of the four other vit_* models",
}

# input side per model: 48 unless listed - the smallest that still gives the last stage of a stride-32 network 2x2
# feature maps, so that 3x3 convs there use more than their centre tap
INPUT_SIZE = {
    "alexnet": 64,  # its three max-pools need at least 63
    "inception_v3": 75,  # the smallest input its stem and reduction blocks accept
    "maxvit_t": 224,  # partitions need the side divisible by 7 * 32
    "vit_b_16": 224, "vit_b_32": 224, "vit_h_14": 224,  # the default image_size=224 build
    "vit_l_16": 32, "vit_l_32": 32,  # built for 32x32 inputs, see BUILD_KWARGS
}
# constructor arguments: ViT-L is built for 32x32 inputs (only the length of the position embedding changes; the
# conv_proj site and every other weight shape are those of the 224 model, and every tap of the patch conv is still
# used); explicit init flags avoid torchvision's warning
BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "vit_l_16": {"image_size": 32}, "vit_l_32": {"image_size": 32},
    "googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True},
}
# why an eligible-looking conv may stay: these are the only skip codes dw-sep{rank=exact} may report
ALLOWED_SKIPS = {"pointwise-kernel", "already-depthwise"}


def test_the_zoo_is_complete() -> None:
    assert len(MODELS) == 80
    assert set(EXCLUDED) <= set(MODELS) and set(INPUT_SIZE) <= set(MODELS) and set(BUILD_KWARGS) <= set(MODELS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box has 2 cores shared with other tests
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _free_memory() -> Iterator[None]:
    yield
    gc.collect()  # models of several GB each: do not let cycles keep the last one alive during the next


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a model whose parameters and buffers live on the meta device: no memory, no init cost.

    (``with torch.device("meta")`` is not enough: RegNet computes its widths with torch ops and ``.tolist()``.)
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = (  # type: ignore[method-assign]
            register_parameter, register_buffer)


def _build(name: str, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    with _parameters_on_meta() if device == "meta" else contextlib.nullcontext():
        model = torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {}))
    model.to(device).eval()
    if device != "meta":
        with torch.no_grad():  # zero-initialised heads (ViT) would make every output 0 whatever the rewrite does
            for p in model.parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0.0, p[0].numel() ** -0.5)
    return model


def _input(name: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    size = INPUT_SIZE.get(name, 48)
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)


def _check_records(result: fxrewrite.RewriteResult) -> list[fxrewrite.SiteRecord]:
    records = result.report.records
    rewritten = [r for r in records if r.status == "rewritten"]
    assert rewritten, "every torchvision classifier has at least one eligible conv"
    unexpected = [(r.site, r.code) for r in records if r.status == "skipped" and r.code not in ALLOWED_SKIPS]
    assert unexpected == []
    return rewritten


@pytest.mark.parametrize("name", [m for m in MODELS if m not in EXCLUDED])
def test_exact_rewrite_reproduces_the_model_and_rank1_cuts_macs(name: str) -> None:
    model = _build(name).double()
    x = _input(name, torch.float64)
    with torch.no_grad():
        y = model(x)
        assert y.std() > 0  # the output depends on the input: the comparison below can fail
        result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=exact}", verify=False)
        rewritten = _check_records(result)
        exact_sites = {r.site for r in rewritten}
        assert all(r.exact is True and r.rel_error == pytest.approx(0.0, abs=1e-9) for r in rewritten)
        torch.testing.assert_close(result.module(x), y)
        del result
        gc.collect()  # a GraphModule is a reference cycle: free its float64 weights before the next copy

        model = model.float()
        x = x.float()
        low = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}", verify=False)
        out = low.module(x)
    rewritten = _check_records(low)
    assert {r.site for r in rewritten} == exact_sites  # rank 1 is below every exact rank: the same sites
    assert out.shape == y.shape and out.dtype == torch.float32 and bool(out.isfinite().all())
    assert all(r.macs_after < r.macs_before and r.params_after < r.params_before for r in rewritten)
    context = low.report.context
    assert context["model_macs_after"] < context["model_macs_before"]
    assert context["model_macs_before"] - context["model_macs_after"] == sum(
        r.macs_before - r.macs_after for r in rewritten)


@pytest.mark.parametrize("name", sorted(EXCLUDED))
def test_excluded_models_still_rewrite_on_the_meta_device(name: str) -> None:
    model = _build(name, device="meta")
    x = _input(name, torch.float32, device="meta")
    y = model(x)
    result = fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1, init=random}", verify=False)
    rewritten = _check_records(result)
    assert all(r.macs_after < r.macs_before for r in rewritten)
    out = result.module(x)
    assert out.shape == y.shape and out.device.type == "meta"
    assert all(p.device.type == "meta" for p in result.module.parameters())
