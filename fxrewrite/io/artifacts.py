"""Artifacts: save a rewritten model as ``.pt2``, ``.onnx``, ``.safetensors`` (+ plan) or a ``.md`` report, atomically.

Every write goes to a temporary file in the destination folder and is moved into place with ``os.replace``; a failure
at any point (export, verification, a second file) leaves no partial file behind and any existing file untouched.
ONNX is exported into a temporary folder under its final name (so the exporter's external-data file,
``model.onnx.data``, is named and referenced correctly) and the files are then moved into place, data first.

- ``.pt2``: ``torch.export`` of the module (an ``ExportedProgram`` is saved as is); loads with
  ``torch.export.load`` without fxrewrite. Verified by loading it back and running ``example_inputs``.
- ``.onnx``: ``torch.onnx.export(..., dynamo=True)``; if that exporter fails, the legacy TorchScript exporter is used
  and the result says so in ``notes``. Verified with onnxruntime when it is installed.
- ``.safetensors``: the state_dict, plus the replay plan as ``<stem>.plan.json`` beside it (and in the file's
  metadata under ``fxrewrite_plan``). ``fxrewrite.io.replay.load_rewritten(fresh_model, path)`` rebuilds the model.
- ``.md`` / ``.json``: the report as Markdown / JSON.

>>> import tempfile, torch, fxrewrite
>>> from pathlib import Path
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
>>> x = torch.randn(1, 3, 16, 16)
>>> result = fxrewrite.rewrite(model, (x,), passes="grouped{groups=2}")
>>> folder = Path(tempfile.mkdtemp())
>>> saved = save(result, folder / "model.pt2", (x,))
>>> saved.format, saved.max_abs_diff
('pt2', 0.0)
>>> sorted(p.name for p in save(result, folder / "model.safetensors").paths)
['model.plan.json', 'model.safetensors']
>>> sorted(p.name for p in folder.iterdir())
['model.plan.json', 'model.pt2', 'model.safetensors']
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxrewrite.errors import ArtifactError, ConfigError, VerificationFailure
from fxrewrite.graph.rewriter import PROVENANCE_KEY
from fxrewrite.io.replay import RewritePlan, plan_from_result, plan_path_for
from fxrewrite.report.report import Report
from fxrewrite.util.files import atomic_dir, atomic_path, atomic_paths, atomic_write_text

FORMATS = {".pt2": "pt2", ".onnx": "onnx", ".safetensors": "safetensors", ".md": "markdown", ".json": "json"}
#: default tolerance of the verification after saving: |saved - eager| <= atol + rtol * |eager| elementwise
ATOL, RTOL = 1e-4, 1e-4


@dataclass(frozen=True)
class SavedArtifact:
    """What ``save`` wrote: the format, the files (main file first), the largest |saved - eager| difference on the
    example inputs when it was checked (None when not), and notes (e.g. an exporter fallback)."""

    format: str
    paths: tuple[Path, ...]
    max_abs_diff: float | None = None
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------
# comparison helpers


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _compare(got: list[Any], expected: list[torch.Tensor], what: str, atol: float, rtol: float) -> float:
    if len(got) != len(expected):
        raise VerificationFailure(f"{what}: {len(got)} outputs, the module has {len(expected)}")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        g_t = torch.as_tensor(g).to(device=e.device, dtype=torch.float64)
        e_t = e.detach().to(torch.float64)
        if tuple(g_t.shape) != tuple(e_t.shape):
            raise VerificationFailure(f"{what}: output {i} has shape {tuple(g_t.shape)}, expected {tuple(e_t.shape)}")
        diff = (g_t - e_t).abs()
        max_diff = float(diff.max()) if diff.numel() else 0.0
        worst = max(worst, max_diff)
        if bool((diff > atol + rtol * e_t.abs()).any()) or not bool(torch.isfinite(g_t).all()):
            raise VerificationFailure(f"{what}: output {i} differs from the module by up to {max_diff:.3g} "
                                      f"(tolerance atol={atol}, rtol={rtol}); nothing was written.")
    return worst


def _reference(module: Any, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    runnable = module.module() if isinstance(module, torch.export.ExportedProgram) else module
    with torch.no_grad():
        return _tensors(runnable(*inputs))


# ---------------------------------------------------------------------------------------------------------------
# writers


def _require_inputs(example_inputs: Any, fmt: str) -> tuple[Any, ...]:
    if example_inputs is None:
        raise ConfigError(f"saving as {fmt} needs example_inputs (a tuple of positional inputs, as for "
                          "torch.export)")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, tuple | list):
        raise ConfigError("example_inputs must be a tuple of positional inputs: write (x,) instead of x.")
    return tuple(example_inputs)


def save_pt2(module: nn.Module | torch.export.ExportedProgram, path: str | Path, example_inputs: Any, *,
             verify: bool = True, atol: float = ATOL, rtol: float = RTOL) -> SavedArtifact:
    """``torch.export`` ``module`` (unless it is an ExportedProgram already) and save it to ``path`` atomically."""
    inputs = _require_inputs(example_inputs, ".pt2")
    if isinstance(module, torch.export.ExportedProgram):
        ep = module
    else:
        try:
            ep = torch.export.export(module, inputs)
        except Exception as exc:
            raise ArtifactError(f"torch.export failed for {type(module).__name__}: {exc}; nothing was written. "
                                "The rewritten module itself is fine; save it as .safetensors instead.") from exc
    diff = None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.export.save(ep, f)
        if verify:
            loaded = torch.export.load(str(tmp))
            with torch.no_grad():
                got = _tensors(loaded.module()(*inputs))
            diff = _compare(got, _reference(module, inputs), f"{Path(path).name} (torch.export.load)", atol, rtol)
    return SavedArtifact("pt2", (Path(path),), diff)


def _onnx_export(model: Any, inputs: tuple[Any, ...], target: Path, dynamo: bool, opset: int | None) -> None:
    kwargs: dict[str, Any] = {"verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    with contextlib.redirect_stdout(sys.stderr):  # exporters print progress; stdout is for --json
        if dynamo:
            torch.onnx.export(model, inputs, str(target), dynamo=True, external_data=True, **kwargs)
        else:
            if isinstance(model, torch.export.ExportedProgram):
                model = model.module()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, inputs, str(target), dynamo=False, **kwargs)


def onnxruntime_outputs(path: str | Path, inputs: tuple[Any, ...]) -> list[Any] | None:
    """Run the ONNX file at ``path`` with onnxruntime on ``inputs`` (None when onnxruntime is not installed)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tensors = _tensors(inputs)
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise VerificationFailure(f"{Path(path).name}: the ONNX graph has {len(names)} inputs, "
                                  f"example_inputs have {len(tensors)} tensors")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}
    return list(session.run(None, feed))


def save_onnx(module: nn.Module | torch.export.ExportedProgram, path: str | Path, example_inputs: Any, *,
              verify: bool = True, atol: float = ATOL, rtol: float = RTOL, dynamo: bool = True,
              opset: int | None = None) -> SavedArtifact:
    """Export ``module`` to ONNX at ``path`` (plus its external-data file), atomically; check with onnxruntime.

    The dynamo exporter is tried first; if it raises, the legacy TorchScript exporter is used and a note says so.
    """
    inputs = _require_inputs(example_inputs, ".onnx")
    final = Path(path)
    notes: list[str] = []
    diff = None
    with atomic_dir(final) as tmpdir:
        target = tmpdir / final.name
        try:
            _onnx_export(module, inputs, target, dynamo, opset)
        except Exception as exc:
            if not dynamo:
                raise ArtifactError(f"ONNX export failed: {exc}; nothing was written.") from exc
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"the dynamo ONNX exporter failed ({type(exc).__name__}: {first}); "
                         "fell back to the legacy TorchScript exporter (torch.onnx.export(dynamo=False))")
            warnings.warn(notes[-1], stacklevel=2)
            for leftover in tmpdir.iterdir():
                leftover.unlink()
            try:
                _onnx_export(module, inputs, target, False, opset)
            except Exception as exc2:
                raise ArtifactError(f"ONNX export failed with both exporters: dynamo: {first}; legacy: {exc2}; "
                                    "nothing was written.") from exc2
        if verify:
            got = onnxruntime_outputs(target, inputs)
            if got is None:
                notes.append("onnxruntime is not installed: the ONNX file was not run")
            else:
                diff = _compare(got, _reference(module, inputs), f"{final.name} (onnxruntime)", atol, rtol)
        side = sorted(p.name for p in tmpdir.iterdir() if p.name != final.name)
    return SavedArtifact("onnx", (final, *(final.parent / s for s in side)), diff, tuple(notes))


def _has_provenance(module: nn.Module) -> bool:
    graph = getattr(module, "graph", None)
    return graph is not None and any(PROVENANCE_KEY in n.meta for n in graph.nodes)


def _plain_state_dict(module: nn.Module | torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; a tensor whose storage was already seen (tied weights) is cloned."""
    state = module.state_dict if isinstance(module, torch.export.ExportedProgram) else module.state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def save_safetensors(module: nn.Module | torch.export.ExportedProgram, path: str | Path, plan: Any = None
                     ) -> SavedArtifact:
    """Save the state_dict as safetensors and the replay plan beside it (``<stem>.plan.json``), atomically."""
    from safetensors.torch import save_file

    if plan is None:
        if _has_provenance(module):
            raise ConfigError("this module was rewritten by fxrewrite, so its weights need a replay plan: pass "
                              "plan=plan_from_result(result), or save the RewriteResult itself.")
        plan = RewritePlan(())
    if not isinstance(plan, RewritePlan):
        raise ConfigError(f"plan must be a RewritePlan, got {type(plan).__name__}")
    final = Path(path)
    plan_path = plan_path_for(final)
    tensors = _plain_state_dict(module)
    text = plan.to_json()
    with atomic_paths([final, plan_path]) as (tmp_weights, tmp_plan):
        save_file(tensors, str(tmp_weights), metadata={"format": "pt", "fxrewrite_plan": text})
        tmp_plan.write_text(text + "\n", encoding="utf-8")
    return SavedArtifact("safetensors", (final, plan_path))


# ---------------------------------------------------------------------------------------------------------------
# the dispatcher


def _unpack(obj: Any) -> tuple[Any, Any, Any]:
    """(module, report, plan) of a RewriteResult, Report, module or ExportedProgram."""
    if isinstance(obj, Report):
        return None, obj, None
    report = getattr(obj, "report", None)
    module = getattr(obj, "module", None)
    if isinstance(report, Report) and isinstance(module, nn.Module | torch.export.ExportedProgram):
        return module, report, plan_from_result(obj)
    if isinstance(obj, nn.Module | torch.export.ExportedProgram):
        return obj, None, None
    raise ConfigError(f"save() takes a RewriteResult, an nn.Module, an ExportedProgram or a Report; "
                      f"got {type(obj).__name__}")


def save(obj: Any, path: str | Path, example_inputs: Any = None, *, plan: Any = None, report: Any = None,
         verify: bool = True, atol: float = ATOL, rtol: float = RTOL, dynamo: bool = True,
         opset: int | None = None) -> SavedArtifact:
    """Save ``obj`` (a RewriteResult, module, ExportedProgram or Report) to ``path``; the format is the suffix.

    ``.pt2`` and ``.onnx`` need ``example_inputs`` and are checked against the module on them (``verify``, with
    ``atol``/``rtol``; a failed check writes nothing). ``.safetensors`` also writes the replay plan (from the
    RewriteResult, or ``plan=``). ``.md``/``.json`` write the report (from the RewriteResult, or ``report=``).
    """
    final = Path(path)
    fmt = FORMATS.get(final.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the format of {final.name!r} from its suffix; use one of "
                          f"{', '.join(FORMATS)}")
    module, own_report, own_plan = _unpack(obj)
    report = report if report is not None else own_report
    plan = plan if plan is not None else own_plan
    if fmt in ("markdown", "json"):
        if report is None:
            raise ConfigError(f"{final.name}: a report file needs a RewriteResult, a Report or report=")
        text = report.to_markdown() if fmt == "markdown" else report.to_json() + "\n"
        return SavedArtifact(fmt, (atomic_write_text(final, text),))
    if module is None:
        raise ConfigError(f"{final.name}: a Report holds no model; save it as .md or .json")
    if fmt == "pt2":
        return save_pt2(module, final, example_inputs, verify=verify, atol=atol, rtol=rtol)
    if fmt == "onnx":
        return save_onnx(module, final, example_inputs, verify=verify, atol=atol, rtol=rtol, dynamo=dynamo,
                         opset=opset)
    return save_safetensors(module, final, plan)

