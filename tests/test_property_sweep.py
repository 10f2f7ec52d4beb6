"""Property sweep over random small models (tests/random_models.py): whatever the model and pipeline, fxrewrite
either rewrites or raises an ``FxRewriteError`` with a message (never another exception: the CLI's exit 3), never
changes the input model, reproduces the model in the exact modes, and never reports non-finite output as ok.

``make test`` runs CASES seeds; ``make test-zoo`` (marked slow) runs SLOW_CASES more.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from random_models import make_case, pipeline_for

import fxrewrite
from fxrewrite.errors import FxRewriteError
from fxrewrite.frontends.cli import main

CASES = 240
SLOW_CASES = 2000


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_cli(seed: int) -> None:
    """The same case through the CLI: exit 0 for a valid pipeline, 2 for a bad one, never 3; JSON on stdout."""
    case = make_case(seed)
    pipeline, kind = pipeline_for(seed)
    if kind not in ("exact", "lossy", "bad"):
        return
    argv = ["rewrite", "random_models:cli_model", "--model-kwargs", json.dumps({"seed": seed}), "--input-shape",
            ",".join(map(str, case.inputs[0].shape)), "--pass", pipeline, "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    expected = 2 if kind == "bad" else 0
    assert code == expected, f"seed {seed}: fxrewrite {' '.join(argv)} -> exit {code}, expected {expected}:\n" \
                             f"{err.getvalue()}"
    if code == 0:
        assert json.loads(out.getvalue())["records"], f"seed {seed}: no records in the JSON report"
    else:
        assert err.getvalue().startswith("fxrewrite: error: "), f"seed {seed}: {err.getvalue()!r}"


def check_case(seed: int) -> None:
    case = make_case(seed)
    pipeline, kind = pipeline_for(seed)
    before = _snapshot(case.model)
    modules_before = [type(m) for m in case.model.modules()]
    if kind == "nan":
        convs = [m for m in case.model.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            convs[seed % len(convs)].weight.view(-1)[0] = float("nan")
        before = _snapshot(case.model)
    with torch.no_grad():
        reference = case.model(*case.inputs)
    options: dict[str, object] = {"passes": pipeline}
    if kind in ("target", "calibrated"):
        options = {"target": fxrewrite.Target(macs=float(pipeline))}
        if kind == "calibrated":
            gen = torch.Generator().manual_seed(seed)
            options["calibration"] = [(torch.randn(case.inputs[0].shape, generator=gen),) for _ in range(2)]
    try:
        result = fxrewrite.rewrite(case.model, case.inputs, **options)
    except FxRewriteError as exc:
        assert str(exc).strip(), f"seed {seed}: {type(exc).__name__} without a message"
        assert kind in ("bad", "nan", "target", "calibrated"), \
            f"seed {seed}: {pipeline} on a valid model raised {type(exc).__name__}: {exc}"
        if kind == "nan":
            assert "non-finite" in str(exc), f"seed {seed}: a NaN weight gave {type(exc).__name__}: {exc}"
        result = None
    after = _snapshot(case.model)
    assert after.keys() == before.keys(), f"seed {seed}: the input model's state_dict keys changed"
    for k in before:  # bit for bit, NaN included
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, k=k: f"seed {seed}: the input model's {k} changed: {m}")
    assert [type(m) for m in case.model.modules()] == modules_before, f"seed {seed}: the input model's modules changed"
    if result is None:
        return
    with torch.no_grad():
        out = result.module(*case.inputs)
    assert out.shape == reference.shape, f"seed {seed}: output shape {tuple(out.shape)} != {tuple(reference.shape)}"
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(reference).all())
    if result.verification is not None and result.verification.ok:
        assert finite, f"seed {seed}: verification ok with non-finite output"
    if kind == "nan":
        assert result.verification is not None and not result.verification.ok, \
            f"seed {seed}: a model with a NaN weight passed verification:\n{result.report}"
    if kind in ("target", "calibrated") and result.budget is not None:
        assert result.budget.macs_after <= float(pipeline) * result.budget.macs_before + 1e-9
    if kind == "exact":
        assert result.ok, f"seed {seed}: {pipeline} exact mode failed verification:\n{result.report}"
        scale = max(float(reference.abs().max()), 1.0)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m: f"seed {seed}, {pipeline}: {m}")
    for r in result.report.records:
        if r.rel_error is not None:
            assert math.isfinite(r.rel_error) and r.rel_error >= 0.0, f"seed {seed}: {r.site} rel_error {r.rel_error}"


@pytest.mark.parametrize("block", range(CASES // 40))
def test_random_models(block: int, one_thread: None) -> None:
    for seed in range(block * 40, (block + 1) * 40):
        check_case(seed)
        if seed % 8 == 0:
            check_cli(seed)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(SLOW_CASES // 100))
def test_random_models_many(block: int, one_thread: None) -> None:
    for seed in range(CASES + block * 100, CASES + (block + 1) * 100):
        check_case(seed)
        if seed % 8 == 0:
            check_cli(seed)


def test_the_sweep_sees_a_broken_exact_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep can fail: with the exact separable split made lossy, an exact case is caught."""
    seed = next(s for s in range(200) if pipeline_for(s)[0].startswith("depthwise-separable{rank=exact}"))
    from fxrewrite.passes.separable import DepthwiseSeparable
    real = DepthwiseSeparable.build

    def lossy(self, site, conv):  # type: ignore[no-untyped-def]
        built = real(self, site, conv)
        with torch.no_grad():
            built.module[-1].weight.mul_(1.01)
        return built

    monkeypatch.setattr(DepthwiseSeparable, "build", lossy)
    with pytest.raises(AssertionError):
        check_case(seed)
