"""The ``fxrewrite`` command line: a thin layer over the Python API.

Subcommands: ``plan`` (dry run), ``rewrite``, ``verify`` (rewrite and gate), ``passes`` (every pass with its options).
``--json`` prints one JSON document on stdout; logs go to stderr. Errors are one line unless FXREWRITE_DEBUG=1.

Exit codes: 0 ok; 1 verification or gate failed; 2 usage or configuration error; 3 internal error; 4 the model
could not be loaded or traced.

>>> code = main(["passes"])  # doctest: +ELLIPSIS
channel-shuffle{...}
...
>>> code
0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INTERNAL, EXIT_MODEL = 0, 1, 2, 3, 4

EPILOG = """exit codes:
  0  ok
  1  verification or gate failed
  2  usage or configuration error (bad pass, option, selector, input shape)
  3  internal error (a bug: please report it with FXREWRITE_DEBUG=1 output)
  4  the model could not be loaded or traced

model specs:
  torchvision:NAME           torchvision model with random weights (e.g. torchvision:resnet18)
  torchvision.KIND:NAME      the same, from one family (detection, segmentation, video, ...)
  timm:NAME                  timm.create_model(NAME, pretrained=False, **--model-kwargs) (needs `pip install timm`)
  package.module:factory     imports the module and calls factory(**--model-kwargs); this RUNS that code,
                             like torch.hub's trust flag: only use specs you trust
  FILE.pt2                   a torch.export.save'd program; input shapes default to the exported ones
  FILE.safetensors --arch SPEC
  FILE.pt|.pth|.bin|.ckpt --arch SPEC
                             a state_dict (or a checkpoint with it under 'state_dict' or 'model'): SPEC is built
                             with random weights (--model-kwargs go to its factory), then the file is loaded strictly
  FILE.pt --unsafe-load      a torch.save'd whole module: refused by default, since unpickling runs arbitrary code
                             from the file (exit 4); --unsafe-load only for files you trust
"""


class UsageError(Exception):
    """A command-line usage error (exit code 2)."""


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"input shape must be comma-separated integers, got {text!r}") from exc
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers, got {text!r}")
    return dims


def _key_json(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected name=JSON, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{key}: value is not JSON: {value!r}") from exc


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model spec: torchvision:NAME, timm:NAME, package.module:factory, FILE.pt2, or a "
                   "state_dict FILE (.safetensors, .pt, .pth) with --arch (see 'model specs' below)")
    p.add_argument("--input-shape", action="append", type=_shape, metavar="1,3,224,224",
                   help="shape of one positional input (repeat for several inputs); default 1,3,224,224, or the "
                        "exported shapes of a .pt2 program")
    p.add_argument("--dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"],
                   help="dtype of the model and inputs (default float32; a .pt2 program keeps its own)")
    p.add_argument("--model-kwargs", default="{}", help="JSON object passed to the model factory (of --arch for a "
                   "state_dict file)")
    p.add_argument("--arch", default=None, metavar="SPEC",
                   help="architecture spec of a state_dict model file, e.g. torchvision:resnet18")
    p.add_argument("--unsafe-load", action="store_true",
                   help="load a torch.save'd whole module (full pickle: runs arbitrary code from the file); only "
                        "for files you trust")
    p.add_argument("--concrete-arg", action="append", type=_key_json, default=[], metavar="NAME=JSON",
                   help="fix a non-tensor forward argument for tracing (repeatable)")
    p.add_argument("--leaf-module", action="append", default=[], metavar="QUALNAME",
                   help="keep this submodule opaque when tracing (repeatable)")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="PIPELINE",
                   help='pass pipeline, e.g. "depthwise-separable{rank=1}" or "grouped{groups=4},channel-shuffle"')
    p.add_argument("--select", action="append", default=[], metavar="NAME|GLOB|re:REGEX",
                   help="only touch matching sites (repeatable; a selector that matches nothing is an error)")
    p.add_argument("--partial", action="store_true",
                   help="for models that do not trace as a whole: rewrite the largest submodules that do")
    p.add_argument("--drop-hooks", action="store_true",
                   help="rewrite convs that have forward hooks, dropping the hooks (skipped with module-hooks "
                        "otherwise)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights of built models and of the generated example inputs (default 0: "
                        "two identical runs give identical reports, timings aside)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--markdown", action="store_true", help="print the report as Markdown")


def _rewrite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtol", type=float, default=None,
                   help="gate: fail (exit 1) when a site's or output's relative L2 error exceeds this")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance added to the gate")
    p.add_argument("--shapes-only", action="store_true", help="verify shapes and costs only (no forward passes)")
    p.add_argument("--no-verify", action="store_true", help="skip verification entirely")
    p.add_argument("--latency", action="store_true", help="also measure latency of original vs rewritten")
    p.add_argument("--output", action="append", default=[], metavar="FILE",
                   help="write the rewritten model: .pt2 (torch.export), .onnx (checked with onnxruntime when "
                        "installed), .safetensors (+ FILE.plan.json replayable with fxrewrite.apply_plan); "
                        "repeatable; every write is atomic")
    p.add_argument("--report", action="append", default=[], metavar="FILE.md|FILE.json",
                   help="write the report as Markdown or JSON (atomic)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="tensor file of inputs (torch.save of a tensor or a list of tensors, loaded with "
                        "weights_only=True): repair the new weights on these activations")
    p.add_argument("--calibration-batch-size", type=int, default=32, metavar="N")
    p.add_argument("--target-macs", type=float, default=None, metavar="FRACTION",
                   help="choose forms and ranks per site so total MACs <= FRACTION x the original (replaces --pass)")
    p.add_argument("--target-params", type=float, default=None, metavar="FRACTION",
                   help="likewise for the parameter count")
    p.add_argument("--target-latency", type=float, default=None, metavar="FRACTION",
                   help="likewise for the whole model's measured latency at the example inputs (per-layer timings "
                        "on --latency-backend guide the search; the final plan is measured whole)")
    p.add_argument("--latency-backend", default="eager", metavar="BACKEND",
                   help="backend that --target-latency times: eager (default), channels_last, onnxruntime, cuda, "
                        "inductor (torch.compile)")
    p.add_argument("--no-latency-check", action="store_true",
                   help="with a target, skip timing the whole original and rewritten model (by default the report "
                        "says, and a warning too, when the rewritten model is slower)")
    p.add_argument("--forms", default=None, help="candidate forms for a target, e.g. 'depthwise-separable,grouped'")
    p.add_argument("--budget-plan", default=None, metavar="FILE.json",
                   help="save the chosen budget plan (replayable with fxrewrite.apply_plan)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxrewrite", description="Rewrite PyTorch convolutions into grouped / "
                                     "depthwise-separable forms at the torch.fx level and report what changed.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("plan", "dry run: list sites and what the passes would do; changes nothing"),
                       ("rewrite", "rewrite the model, verify it against the original and print the report"),
                       ("verify", "rewrite the model and gate on the verification (exit 1 when it fails)")):
        p = sub.add_parser(name, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _model_args(p)
        if name != "plan":
            _rewrite_args(p)
    p = sub.add_parser("passes", help="list every pass with its options and defaults")
    p.add_argument("--json", action="store_true")
    return parser


def _list_passes(as_json: bool) -> str:
    from fxrewrite.passes import REGISTRY
    entries = []
    for name, cls in sorted(REGISTRY.items()):
        fields = dataclasses.fields(cls)
        options = {f.name: (None if f.default is dataclasses.MISSING else f.default) for f in fields}
        types = {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                 for f in fields}
        required = [f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        entries.append({"name": name, "description": cls.description, "options": options, "types": types,
                        "required": required})
    if as_json:
        return json.dumps({"passes": entries}, indent=2, default=str)
    lines = []
    for e in entries:
        opts = ", ".join(f"{k}={v}" for k, v in e["options"].items())
        typed = "; ".join(f"{k}: {e['types'][k]}" for k in e["options"]) or "none"
        lines.append(f"{e['name']}{{{opts}}}\n    {e['description']}\n    options: {typed}")
    return "\n".join(lines)


def _check_writable(path: str, option: str) -> None:
    """A file the run will write: its folder must exist and be writable, and it must not be a folder itself; checked
    before any work, so a typo costs nothing."""
    from fxrewrite.io.artifacts import FORMATS
    target = Path(path)
    if target.suffix not in FORMATS:
        raise UsageError(f"{option} {path}: unknown format {target.suffix or '(no suffix)'!r}; use one of "
                         f"{', '.join(FORMATS)}")
    folder = target.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if target.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {path}: folder {folder} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise UsageError(f"cannot write {path}: the existing file is read-only")


def _seed(seed: int) -> None:
    """Seed every generator a model factory or input generator may draw from."""
    import random

    import torch
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    numpy.random.seed(seed % 2**32)


def _run_model_command(args: argparse.Namespace) -> tuple[str, int]:
    import torch

    from fxrewrite.budget.target import Target
    from fxrewrite.frontends.api import plan, rewrite
    from fxrewrite.frontends.models import example_inputs, exported_graph_module, resolve_model

    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise UsageError("--model-kwargs must be a JSON object")
    for option in ("output", "report"):
        for path in getattr(args, option, []):
            _check_writable(path, f"--{option}")
    if getattr(args, "budget_plan", None):
        _check_writable(args.budget_plan, "--budget-plan")
    _seed(args.seed)
    model = resolve_model(args.model, kwargs, arch=args.arch, unsafe_load=args.unsafe_load)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    exported = isinstance(model, torch.export.ExportedProgram)
    if exported:
        _check_exported_options(args)
        inputs = example_inputs(model, args.input_shape, dtype)
    else:
        model = model.to(dtype or torch.float32)
        # a dry run needs shapes only: meta inputs stand for them without memory (partial mode runs the model)
        dry = args.command == "plan" and not args.partial
        inputs = example_inputs(model, args.input_shape or [(1, 3, 224, 224)], dtype,
                                device="meta" if dry else None)
    capture = {"concrete_args": dict(args.concrete_arg) or None, "leaf_modules": args.leaf_module}
    passes = ",".join(args.passes) or None
    select = args.select or None
    if args.command == "plan":
        planned = exported_graph_module(model) if exported else model
        result: Any = plan(planned, inputs, passes, select=select, partial=args.partial,
                           drop_hooks=args.drop_hooks, **capture)
        if args.json:
            sites = [dataclasses.asdict(s) for s in result.sites]
            doc = {"sites": sites, "plan": result.report.to_dict()}
            return json.dumps(doc, indent=2, default=str), EXIT_OK
        return (result.report.to_markdown() if args.markdown and result.records else str(result)), EXIT_OK
    from fxrewrite.io.artifacts import save
    from fxrewrite.verification.verify import cli_exit_code
    verify: bool | str = False if args.no_verify else ("shapes" if args.shapes_only else True)
    calibration = None
    if args.calibration:
        from fxrewrite.tuning.repair import load_calibration
        calibration = load_calibration(args.calibration, batch_size=args.calibration_batch_size,
                                       dtype=dtype or torch.float32)
    target = forms = None
    if args.target_macs is not None or args.target_params is not None or args.target_latency is not None:
        from fxrewrite.budget.forms import parse_forms
        if passes:
            raise UsageError("--target-macs/--target-params/--target-latency choose the passes: do not combine them "
                             "with --pass")
        target = Target(macs=args.target_macs, params=args.target_params, latency=args.target_latency,
                        backend=args.latency_backend, check_latency=not args.no_latency_check)
        forms = parse_forms(args.forms) if args.forms else None
    result = rewrite(model, inputs, passes, select=select, **capture, verify=verify, rtol=args.rtol,
                     atol=args.atol, latency=args.latency, calibration=calibration, target=target,
                     forms=forms, partial=args.partial, drop_hooks=args.drop_hooks)
    if result.budget is not None:
        print(result.budget.table(result), file=sys.stderr)
        if args.budget_plan:
            print(f"fxrewrite: wrote {result.budget.save(args.budget_plan, result)}", file=sys.stderr)
    gated = args.command == "verify" or args.rtol is not None
    code = cli_exit_code(result.verification) if gated and result.verification is not None else EXIT_OK
    if code != EXIT_OK and args.output:
        print(f"fxrewrite: not writing {', '.join(args.output)}: the verification gate failed", file=sys.stderr)
    if code == EXIT_OK:  # a model that failed its gate is not written out
        for path in args.output:
            saved = save(result, path, inputs)
            checked = f" (max |saved - eager| = {saved.max_abs_diff:.2e})" if saved.max_abs_diff is not None else ""
            print(f"fxrewrite: wrote {', '.join(map(str, saved.paths))}{checked}", file=sys.stderr)
    for path in args.report:
        save(result, path)
        print(f"fxrewrite: wrote {path}", file=sys.stderr)
    report = result.report
    if args.json:
        return report.to_json(), code
    return (report.to_markdown() if args.markdown else str(report)), code


def _check_exported_options(args: argparse.Namespace) -> None:
    """A .pt2 program is captured already and rewritten as a whole: the capture and whole-model options do not
    apply to it."""
    options = ("concrete_arg", "leaf_module", "partial", "drop_hooks", "calibration", "target_macs",
               "target_params", "target_latency")
    given = ["--" + name.replace("_", "-") for name in options if getattr(args, name, None) not in (None, False, [])]
    if given:
        raise UsageError(f"{', '.join(given)}: not for a .pt2 program (it is captured already); rewrite "
                         "the eager model instead")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fxrewrite`` and ``python -m fxrewrite``; returns the exit code."""
    from fxrewrite.errors import (
        ConfigError,
        FxRewriteError,
        ModelLoadError,
        TraceFailure,
        VerificationFailure,
    )

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 on --help
        return int(exc.code or 0)
    debug = os.environ.get("FXREWRITE_DEBUG") == "1"
    try:
        if args.command == "passes":
            print(_list_passes(args.json))
            return EXIT_OK
        text, code = _run_model_command(args)
        print(text)
        return code
    except (ModelLoadError, TraceFailure) as exc:
        return _fail(exc, EXIT_MODEL, debug)
    except VerificationFailure as exc:
        return _fail(exc, EXIT_GATE, debug)
    except (ConfigError, UsageError) as exc:
        return _fail(exc, EXIT_USAGE, debug)
    except FxRewriteError as exc:
        return _fail(exc, EXIT_INTERNAL, debug)
    except Exception as exc:
        return _fail(exc, EXIT_INTERNAL, debug, internal=True)


def _fail(exc: BaseException, code: int, debug: bool, internal: bool = False) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    else:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        prefix = "internal error" if internal else "error"
        hint = " (set FXREWRITE_DEBUG=1 for the traceback)" if internal else ""
        more = "\n" + "\n".join(str(exc).strip().splitlines()[1:]) if len(str(exc).strip().splitlines()) > 1 else ""
        print(f"fxrewrite: {prefix}: {first}{hint}{more}", file=sys.stderr)
    return code
