"""Capture: ``nn.Module`` -> ``torch.fx.GraphModule`` of a deep copy, with errors that point at the user's code.

Every ``nn.Conv2d`` (and any subclass of it) is kept as a leaf ``call_module`` node, so a subclass with its own
forward (timm's ``Conv2dSame``, ``StdConv2d``, parametrized convs) is visible as one site with a reason, never
silently traced through and treated as a plain convolution.

>>> import torch
>>> from fxrewrite.capture import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import copy
import inspect
import linecache
import os
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import TraceFailure

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))

LeafSpec = str | type[nn.Module]


class _Tracer(torch.fx.Tracer):
    """A tracer whose leaves are torch's own modules, every Conv2d (subclasses too) and the user's leaves."""

    def __init__(self, leaf_names: frozenset[str], leaf_types: tuple[type, ...],
                 autowrap_functions: tuple[Callable[..., Any], ...]) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self._leaf_names = leaf_names
        self._leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.Conv2d) or module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _check_traceable_type(model: object) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceFailure(
            f"{type(model).__name__} is a TorchScript module; torch.fx cannot trace it. Pass the original Python "
            "nn.Module (before torch.jit.script/trace) instead.")
    if isinstance(model, torch.export.ExportedProgram):
        raise TraceFailure(
            "got a torch.export.ExportedProgram; fxrewrite.trace captures eager nn.Modules. Pass the nn.Module you "
            "exported, or call ep.module() to get a GraphModule.")
    if not isinstance(model, nn.Module):
        raise TraceFailure(f"expected a torch.nn.Module, got {type(model).__name__}.")


def trace(model: nn.Module, *, concrete_args: Mapping[str, Any] | None = None,
          leaf_modules: Iterable[LeafSpec] = (),
          autowrap_functions: Iterable[Callable[..., Any]] = ()) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` into a GraphModule; the user's model is never mutated.

    ``concrete_args`` fixes non-tensor forward arguments (flags); ``leaf_modules`` (qualified names or module types)
    are kept as opaque calls (their inner convolutions are then not visible); ``autowrap_functions`` are recorded as
    calls instead of being traced (``len``-using helpers). An existing GraphModule is deep-copied as is.

    >>> import torch
    >>> gm = trace(torch.nn.Conv2d(3, 8, 3))
    >>> gm.graph.find_nodes(op="call_module")[0].target
    'conv'
    """
    _check_traceable_type(model)
    copied = copy.deepcopy(model)
    if isinstance(copied, torch.fx.GraphModule):
        return copied
    leaf_specs = list(leaf_modules)
    leaf_names = frozenset(s for s in leaf_specs if isinstance(s, str))
    leaf_types = tuple(s for s in leaf_specs if isinstance(s, type))
    known = {name for name, _ in copied.named_modules()}
    unknown = sorted(n for n in leaf_names if n not in known)
    if unknown:
        import difflib
        hints = {n: difflib.get_close_matches(n, known, n=3) for n in unknown}
        raise TraceFailure("leaf_modules names no submodule: " + "; ".join(
            f"{n!r} (closest: {', '.join(h) or 'none'})" for n, h in hints.items()))
    # A model that is itself a Conv2d is one call of a real submodule, so it is a site like any other.
    if isinstance(copied, nn.Conv2d):
        return _wrap_single_conv(copied)
    tracer = _Tracer(leaf_names, leaf_types, tuple(autowrap_functions))
    try:
        graph = tracer.trace(copied, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:  # torch raises TraceError, RuntimeError, TypeError... all mean "not traceable"
        raise TraceFailure(_explain(exc, copied)) from exc
    return torch.fx.GraphModule(tracer.root, graph, copied.__class__.__name__)


def _wrap_single_conv(conv: nn.Conv2d) -> torch.fx.GraphModule:
    holder = nn.Module()
    holder.add_module("conv", conv)
    graph = torch.fx.Graph()
    x = graph.placeholder("input")
    graph.output(graph.call_module("conv", (x,)))
    return torch.fx.GraphModule(holder, graph, type(conv).__name__)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that is the user's code (not torch's, not fxrewrite's)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_OWN_DIR) and "<" not in frame.filename:
            return frame
    return None


def _frame_module(exc: BaseException, model: nn.Module) -> str | None:
    """Qualified name of the submodule whose forward raised, found from ``self`` in the user's frame."""
    tb = exc.__traceback__
    owner = None
    while tb is not None:
        path = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_OWN_DIR):
            candidate = tb.tb_frame.f_locals.get("self")
            if isinstance(candidate, nn.Module):
                owner = candidate
        tb = tb.tb_next
    if owner is None:
        return None
    for name, module in model.named_modules():
        if module is owner:
            return name
    return None


def _flag_arguments(model: nn.Module) -> list[str]:
    """Forward parameters whose default is a plain Python value (a flag): candidates for ``concrete_args``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params
            if p.default is not inspect.Parameter.empty and isinstance(p.default, bool | int | str | type(None))]


def _explain(exc: BaseException, model: nn.Module) -> str:
    frame = _user_frame(exc)
    where = "in an unknown location"
    if frame is not None:
        code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
        where = f"at {frame.filename}:{frame.lineno}: `{code}`"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = f"{message}".lower()
    owner = _frame_module(exc, model)
    flags = _flag_arguments(model)
    code_line = (frame.line or "") if frame is not None else ""
    if ("len" in text and ("not supported" in text or "'len'" in text)) or ("len(" in code_line and "len" in text):
        fix = ("`len()` of a traced value: decorate the helper that calls len() with `torch.fx.wrap` (or pass it in "
               "autowrap_functions=) so it is recorded as a call, or pass leaf_modules=[...] for the submodule.")
    elif "control flow" in text or "iterated" in text or "bool" in text:
        used_flags = [f for f in flags if f in code_line]
        if used_flags and not owner:
            fix = ("the branch depends on a forward argument: fix it with concrete_args="
                   + "{" + ", ".join(f"{f!r}: <value>" for f in used_flags) + "}.")
        elif owner:
            fix = (f"data-dependent control flow inside submodule {owner!r}: keep it opaque with "
                   f"leaf_modules=[{owner!r}] (its convolutions are then not rewritten), or use partial=True.")
        else:
            hint = f" concrete_args for the flag arguments {flags}," if flags else ""
            fix = ("data-dependent control flow in the model's own forward: use" + hint + " rewrite the branch "
                   "with torch.where, or mark the enclosing submodule with leaf_modules=[...].")
    else:
        fix = ("if a submodule cannot be traced, pass leaf_modules=[its qualified name]; fix flag arguments with "
               "concrete_args={...}; wrap helper functions with torch.fx.wrap.")
    return f"torch.fx could not trace {type(model).__name__} {where}\n  torch says: {message}\n  fix: {fix}"
