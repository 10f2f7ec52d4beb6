"""Capture: ``nn.Module`` -> ``torch.fx.GraphModule`` of a deep copy, with errors that point at the user's code.

Every ``nn.Conv2d`` (and any subclass of it) is kept as a leaf ``call_module`` node, so a subclass with its own
forward (timm's ``Conv2dSame``, ``StdConv2d``, parametrized convs) is visible as one site with a reason, never
silently traced through and treated as a plain convolution.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
>>> [n.op for n in gm.graph.nodes]
['placeholder', 'call_module', 'call_module', 'output']
"""

from __future__ import annotations

import difflib
import inspect
import linecache
import os
import re
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError, TraceFailure
from fxrewrite.graph.module_copy import copy_module
from fxrewrite.graph.ownership import SharedTensors
from fxrewrite.util.runtime import find_submodule

# Trailing separators: "site-packages/torch" must not swallow "site-packages/torchvision" (a model library whose
# frames are the ones to show).
_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")
_OWN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")
_FLAG_TYPES = (bool, int, float, str, type(None))
_FLAG_ANNOTATIONS = frozenset({"bool", "int", "float", "str", "Optional[bool]", "bool | None", "Optional[str]",
                               "str | None", "Optional[int]", "int | None"})

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


def check_traceable_type(model: object) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise TraceFailure(
            f"{type(model).__name__} is a TorchScript module; torch.fx cannot trace it. Pass the original Python "
            "nn.Module (before torch.jit.script/trace) instead.")
    if isinstance(model, torch.export.ExportedProgram):
        raise TraceFailure(
            "got a torch.export.ExportedProgram; fxrewrite.trace captures eager nn.Modules. Pass the nn.Module you "
            "exported, or call ep.module() to get a GraphModule.")
    if not isinstance(model, nn.Module):
        hint = (" Wrap the function in an nn.Module whose forward calls it." if callable(model) else "")
        raise TraceFailure(f"expected a torch.nn.Module, got {type(model).__name__}.{hint}")


def _forward_parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    """The forward's parameters (without ``self``), or None when the signature cannot be read."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def check_capture_options(model: nn.Module, concrete_args: Mapping[str, Any] | None, leaf_specs: list[object]) -> None:
    """Every capture option must name something that exists; all problems are reported together."""
    problems = []
    bad_specs = [s for s in leaf_specs if not isinstance(s, str) and not (isinstance(s, type)
                                                                            and issubclass(s, nn.Module))]
    if bad_specs:
        problems.append(f"leaf_modules entries must be qualified names or nn.Module types, got {bad_specs!r}")
    known = [name for name, _ in model.named_modules() if name]
    for name in sorted(s for s in leaf_specs if isinstance(s, str) and s not in known):
        close = difflib.get_close_matches(name, known, n=3)
        problems.append(f"leaf_modules: {name!r} names no submodule (closest: {', '.join(close) or 'none'})")
    params = _forward_parameters(model)
    if concrete_args and params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
        names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        problems += [f"concrete_args: {k!r} is not an argument of {type(model).__name__}.forward; arguments: "
                     f"{', '.join(names) or 'none'}" for k in concrete_args if k not in names]
    if problems:
        raise ConfigError("invalid capture options: " + "; ".join(problems))


def trace(model: nn.Module, *, concrete_args: Mapping[str, Any] | None = None,
          leaf_modules: Iterable[LeafSpec] = (),
          autowrap_functions: Iterable[Callable[..., Any]] = (),
          share_tensors: SharedTensors | None = None, runnable: bool = True) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` into a GraphModule; the user's model is never mutated.

    ``concrete_args`` fixes non-tensor forward arguments (flags); ``leaf_modules`` (qualified names or module types)
    are kept as opaque calls (their inner convolutions are then not visible); ``autowrap_functions`` are recorded as
    calls instead of being traced (``len``-using helpers). An existing GraphModule is deep-copied as is.
    ``share_tensors`` (``graph.ownership.SharedTensors(model)``) copies the modules but not their parameters and
    buffers, which stay ``model``'s own: the caller must give the copy its own (``share_tensors.own``) before
    anything may change one in place, and before handing the copy out. ``runnable=False`` leaves the Python code
    of the traced graph ungenerated (~11 ms of a ResNet-152's capture) for a caller that edits the graph and
    recompiles anyway: :func:`make_runnable` turns it into a plain GraphModule before anything may call it.

    >>> import torch
    >>> gm = trace(torch.nn.Conv2d(3, 8, 3))
    >>> gm.graph.find_nodes(op="call_module")[0].target
    'conv'
    """
    check_traceable_type(model)
    try:
        copied = copy_module(model, share_tensors.memo() if share_tensors is not None else None)
    except Exception as exc:
        raise TraceFailure(
            f"cannot deep-copy {type(model).__name__} ({type(exc).__name__}: {exc}); fxrewrite never edits the "
            "user's model, so it needs a copy. Old-style torch.nn.utils.weight_norm / spectral_norm hooks are a "
            "common cause: use torch.nn.utils.parametrizations instead.") from exc
    if isinstance(copied, torch.fx.GraphModule):
        return copied
    leaf_specs = list(leaf_modules)
    check_capture_options(copied, concrete_args, leaf_specs)
    leaf_names = frozenset(s for s in leaf_specs if isinstance(s, str))
    leaf_types = tuple(s for s in leaf_specs if isinstance(s, type))
    # A model that is itself a Conv2d is one call of a real submodule, so it is a site like any other.
    if isinstance(copied, nn.Conv2d):
        return _wrap_single_conv(copied)
    tracer = _Tracer(leaf_names, leaf_types, tuple(autowrap_functions))
    try:
        graph = tracer.trace(copied, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:  # torch raises TraceError, RuntimeError, TypeError... all mean "not traceable"
        raise TraceFailure(_explain(exc, copied)) from exc
    gm = (torch.fx.GraphModule if runnable else _InterpretedGraphModule)(tracer.root, graph,
                                                                           copied.__class__.__name__)
    if concrete_args:
        _default_concrete_placeholders(gm, concrete_args)
    return gm


class _InterpretedGraphModule(torch.fx.GraphModule):
    """A GraphModule that is only read and interpreted (``torch.fx.Interpreter``, ``run_nodes``): no Python code is
    generated and compiled for it (most of what building a GraphModule over a large graph costs), so calling it
    raises ``NotImplementedError``."""

    def recompile(self) -> Any:
        return None


def make_runnable(gm: torch.fx.GraphModule, *, generate: bool = True) -> torch.fx.GraphModule:
    """Make a GraphModule built with ``runnable=False`` a plain ``torch.fx.GraphModule``, in place: its class
    becomes one of torch's own per-instance kind, and its code is generated now (``generate=False``: by the caller's
    next ``recompile()``, before anything calls it). Any other GraphModule is returned as it is.

    >>> gm = trace(torch.nn.ReLU(), runnable=False)
    >>> make_runnable(gm) is gm, type(gm).__mro__[1] is torch.fx.GraphModule, gm(torch.tensor([-1.0])).tolist()
    (True, True, [0.0])
    """
    if isinstance(gm, _InterpretedGraphModule):
        # what GraphModule.__new__ does for every instance: a subclass of its own, on which recompile sets forward
        impl = type("GraphModuleImpl", (torch.fx.GraphModule,), {"__module__": torch.fx.GraphModule.__module__})
        impl.__qualname__ = "GraphModule.__new__.<locals>.GraphModuleImpl"
        gm.__class__ = impl
        if generate:
            gm.recompile()
    return gm


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` with the same node names, node meta copied shallowly.

    >>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()))
    >>> [n.name for n in copy_graph(gm.graph).nodes] == [n.name for n in gm.graph.nodes]
    True
    """
    copied = torch.fx.Graph()
    copied._codegen = graph._codegen
    copied.output(copied.graph_copy(graph, {}))
    return copied


def graph_module_over(root: nn.Module, graph: torch.fx.Graph, *, runnable: bool = True) -> torch.fx.GraphModule:
    """A GraphModule of ``graph`` over ``root``'s own submodules and parameters (nothing is copied; ``graph`` must
    name them as a trace of ``root`` does). ``runnable=False`` skips generating its Python code: for a module that
    is only interpreted (the verifier's), calling it raises.

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> gm = graph_module_over(model, copy_graph(trace(model).graph), runnable=False)
    >>> gm.get_submodule("0") is model[0], torch.fx.Interpreter(gm).run(torch.zeros(1, 3, 5, 5)).shape
    (True, torch.Size([1, 8, 3, 3]))
    """
    if runnable:
        return torch.fx.GraphModule(root, graph, type(root).__name__)
    targets = {str(n.target) for n in graph.nodes if n.op in ("get_attr", "call_module")}
    if not all(_held(root, t) for t in targets):  # a target root lacks: torch builds it (or raises) as usual
        return _InterpretedGraphModule(root, graph, type(root).__name__)
    # root's own module, parameter and buffer tables, shared rather than rebuilt target by target (~4 ms on a
    # ResNet-152): every target resolves to what it names in root; nothing is copied or changed
    gm = _InterpretedGraphModule({}, torch.fx.Graph(), type(root).__name__)
    for table in ("_modules", "_parameters", "_buffers"):
        gm.__dict__[table] = root.__dict__[table]
    gm.training = root.training
    gm.graph = graph
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:  # as GraphModule.__init__ does
        gm._tracer_cls = graph._tracer_cls
    gm._tracer_extras = graph._tracer_extras or {}
    return gm


def _held(root: nn.Module, target: str) -> bool:
    """Whether ``target`` names a submodule, parameter or buffer of ``root`` (through its ``_modules`` tables)."""
    path, _, leaf = target.rpartition(".")
    module = find_submodule(root, path)
    return module is not None and (leaf in module._modules or leaf in module._parameters or leaf in module._buffers)


def _shallow_graph_module(gm: torch.fx.GraphModule, runnable: bool = True) -> torch.fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules and parameters over a copy of its graph (node meta copied
    shallowly), so shape propagation can set ``meta["val"]`` without touching the caller's graph."""
    graph = copy_graph(gm.graph)
    for node in graph.nodes:  # stale values (a rewriter's best-effort metadata) must not pass for propagated ones
        node.meta.pop("val", None)
        node.meta.pop("tensor_meta", None)
    return graph_module_over(gm, graph, runnable=runnable)


def as_graph_module(model: nn.Module, *, concrete_args: Mapping[str, Any] | None = None,
                    leaf_modules: Iterable[LeafSpec] = (),
                    autowrap_functions: Iterable[Callable[..., Any]] = (), runnable: bool = True
                    ) -> torch.fx.GraphModule:
    """A GraphModule over ``model`` *without copying its parameters* (``fxrewrite.trace`` deep-copies; the verifier
    only reads, so a 2.6 GB model is not duplicated). Same leaves and node names as ``fxrewrite.trace``.
    ``runnable=False``: see :func:`graph_module_over`."""
    if isinstance(model, torch.fx.GraphModule):
        return _shallow_graph_module(model, runnable)
    check_traceable_type(model)
    if isinstance(model, nn.Conv2d):
        return _wrap_single_conv(model)
    specs = list(leaf_modules)
    tracer = _Tracer(frozenset(s for s in specs if isinstance(s, str)),
                             tuple(s for s in specs if isinstance(s, type)), tuple(autowrap_functions))
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:
        raise TraceFailure(_explain(exc, model)) from exc
    gm = graph_module_over(tracer.root, graph, runnable=runnable)
    if concrete_args:  # as capture.trace does: the specialised values become the defaults
        _default_concrete_placeholders(gm, concrete_args)
    return gm


def _default_concrete_placeholders(gm: torch.fx.GraphModule, concrete_args: Mapping[str, Any]) -> None:
    """Make each specialised argument default to the value it was specialised to.

    torch.fx keeps a placeholder for a concrete argument, with the *signature's* default, and asserts that the
    value passed equals the concrete one: ``forward(x, flag=True)`` traced with ``flag=False`` would fail when called
    as ``gm(x)``. The default becomes the concrete value, so ``gm(x)`` runs the specialised graph (and passing
    another value still trips torch's assertion). Skipped where a later placeholder has no default (Python forbids
    it); such a module needs the argument passed explicitly. torch.fx also renames the argument (``flag_1``); a
    plain flag gets its own name back, so ``gm(x, flag=False)`` works wherever the original was called that way.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    changed = False
    for name, value in concrete_args.items():
        leaves = torch.utils._pytree.tree_leaves(value)
        for i, leaf in enumerate(leaves, start=1):
            if isinstance(leaf, torch.fx._symbolic_trace.PHBase | torch.Tensor) or not isinstance(leaf, _FLAG_TYPES):
                continue
            node = next((n for n in placeholders if n.target == f"{name}_{i}"), None)
            if node is None:
                continue
            if len(leaves) == 1 and leaves[0] is value and not any(n.target == name for n in placeholders):
                node.target = name
                changed = True
            later = placeholders[placeholders.index(node) + 1:]
            if all(n.args for n in later):
                node.args = (leaf,)
                changed = True
    if changed:
        gm.recompile()


def _wrap_single_conv(conv: nn.Conv2d) -> torch.fx.GraphModule:
    holder = nn.Module()
    holder.add_module("conv", conv)
    graph = torch.fx.Graph()
    x = graph.placeholder("input")
    graph.output(graph.call_module("conv", (x,)))
    return torch.fx.GraphModule(holder, graph, type(conv).__name__)


def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not path.startswith((_TORCH_DIR, _OWN_DIR)) and "<" not in filename


def _user_frames(exc: BaseException) -> list[tuple[traceback.FrameSummary, Any]]:
    """(summary, frame) of every traceback frame in the user's code (not torch's, not fxrewrite's), outermost first."""
    out = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if _is_user_file(code.co_filename):
            line = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            summary = traceback.FrameSummary(code.co_filename, tb.tb_lineno, code.co_name, line=line)
            out.append((summary, tb.tb_frame))
        tb = tb.tb_next
    return out


def _owner(exc: BaseException, model: nn.Module) -> tuple[str, nn.Module] | None:
    """Qualified name and module of the innermost submodule of ``model`` whose code is on the failing stack.

    Torch's frames count too: a user's ``BatchNorm2d`` subclass fails inside torch's batchnorm.py, and that module is
    the one to make a leaf.
    """
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and id(candidate) in names:
            found = (names[id(candidate)], candidate)
        tb = tb.tb_next
    return found


def _flag_candidates(module: nn.Module) -> list[str]:
    """Forward parameters after the first that look like Python flags (a plain default or a plain annotation)."""
    params = _forward_parameters(module) or []
    out = []
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        annotation = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        plain_default = p.default is not p.empty and isinstance(p.default, _FLAG_TYPES)
        if plain_default or annotation in _FLAG_ANNOTATIONS or (p.default is p.empty and "Tensor" not in annotation):
            out.append(p.name)
    return out


def _mentions(code_line: str, names: Iterable[str]) -> list[str]:
    return [n for n in names if re.search(rf"\b{re.escape(n)}\b", code_line)]


def _explain(exc: BaseException, model: nn.Module) -> str:
    """The TraceFailure text: where in the user's code, what torch said, and the fix that applies."""
    frames = _user_frames(exc)
    frame = frames[-1][0] if frames else None
    owner = _owner(exc, model)
    owner_name = owner[0] if owner else None
    where = "(no frame of the model's own code is on the stack)"
    if owner_name:
        where = (f"in submodule {owner_name!r} ({type(owner[1]).__name__}, torch's code: no frame of the model's "
                 "own code is on the stack)")
    code_line = ""
    if frame is not None:
        code_line = frame.line or ""
        where = f"at {frame.filename}:{frame.lineno} in {frame.name}(): `{code_line}`"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = message.lower()
    in_submodule = bool(owner_name)
    func = frame.name if frame is not None else ""
    if "'len'" in text or ("len" in text and "len(" in code_line):
        in_helper = bool(frames) and not isinstance(frames[-1][1].f_locals.get("self"), nn.Module)
        if in_helper and func.isidentifier():
            fix = (f"`len()` of a traced value inside the helper {func}(): pass autowrap_functions=[{func}] (or "
                   f"decorate {func} with @torch.fx.wrap at module level) so it is recorded as one call")
        else:
            fix = ("`len()` of a traced value: use x.shape[0] / x.size(0) instead (shapes trace), or move the "
                   "len() call into a module-level helper and pass it in autowrap_functions=[helper] (or decorate "
                   "it with @torch.fx.wrap)")
        if in_submodule:
            fix += f", or keep submodule {owner_name!r} opaque with leaf_modules=[{owner_name!r}]"
        fix += "."
    elif "control flow" in text or "iterated" in text or "bool" in text:
        flags = _mentions(code_line, _flag_candidates(owner[1])) if owner is not None else []
        root_flags = _flag_candidates(model)
        if flags and not in_submodule:
            fix = ("the branch depends on the forward argument(s) " + ", ".join(flags) + ": fix them with "
                   "concrete_args={" + ", ".join(f"{f!r}: <value>" for f in flags) + "}.")
        elif in_submodule:
            fix = (f"data-dependent control flow inside submodule {owner_name!r}: keep it opaque with "
                   f"leaf_modules=[{owner_name!r}] (its convolutions are then not rewritten)")
            if root_flags:
                fix += f"; if the branch follows a forward argument, fix it with concrete_args (one of {root_flags})"
            fix += "."
        else:
            fix = ("data-dependent control flow in the model's own forward: rewrite the branch with torch.where, "
                   "or move it into a submodule and pass that submodule in leaf_modules=[...]")
            if root_flags:
                fix += f"; if the branch follows a forward argument, fix it with concrete_args (one of {root_flags})"
            fix += "."
    else:
        fix = ("if a submodule cannot be traced, pass leaf_modules=[its qualified name]"
               + (f" (the failing code is in {owner_name!r})" if in_submodule else "")
               + "; fix flag arguments with concrete_args={...}; wrap helper functions with torch.fx.wrap.")
    return f"torch.fx could not trace {type(model).__name__} {where}\n  torch says: {message}\n  fix: {fix}"
