"""The rewriter: the only code in fxrewrite that mutates a graph.

``replace_conv`` puts a replacement (a plain ``nn.Conv2d`` or an ``nn.Sequential`` of them) at the site's qualified
name, so state_dict keys stay predictable (``layer1.0.conv1.0.weight``, ``layer1.0.conv1.1.weight``) and saved
models load without fxrewrite; the Sequential's children become separate ``call_module`` nodes, so ``gm.code`` shows
each convolution and later passes see them. ``insert_methods_before`` puts a chain of plain tensor methods (a channel
shuffle: ``unflatten`` / ``transpose`` / ``flatten``) on one input edge of a node, ``insert_op_before`` a function
call; ``set_conv_weight`` swaps a conv's weight keeping its dtype, device, layout and requires_grad;
``permute_channels`` reorders a conv's / batch norm's channels (folds a channel permutation into a layer). New
nodes carry ``node.meta["val"]`` (shape metadata, no compute) and ``node.meta["fxrewrite"]`` (provenance).
``finalize`` lints, drops dead submodules, recompiles and makes the module ``portable``: a pickled result loads
without fxrewrite.

>>> import torch
>>> from torch import nn
>>> from fxrewrite.graph.capture import trace
>>> gm = trace(nn.Sequential(nn.Conv2d(4, 4, 3)))
>>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
>>> _ = replace_conv(gm, node, nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)), {"pass": "demo"})
>>> _ = gm.recompile(); sorted(gm.state_dict())
['0.0.bias', '0.0.weight', '0.1.bias', '0.1.weight']
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from fxrewrite.graph.shapes import step_output_shape
from fxrewrite.util.runtime import submodule

PROVENANCE_KEY = "fxrewrite"

#: Set while a caller (``PassManager``) lints and recompiles right after each pass: ``finalize`` then leaves both
#: to it, so that a pipeline step compiles its code once instead of twice.
_CALLER_RECOMPILES: contextvars.ContextVar[bool] = contextvars.ContextVar("fxrewrite_caller_recompiles",
                                                                          default=False)


def _set_submodule(gm: torch.fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = submodule(gm, parent_name) if parent_name else gm
    setattr(parent, leaf, module)


def _unique_attr(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _conv_val(val: Any, conv: nn.Module) -> Any:
    """Shape metadata of ``conv`` (a Conv2d, or a shape-only step such as a channel repeat, run on a meta tensor)
    applied to a value with metadata ``val`` (None when unknown)."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return _empty_like_val(val, step_output_shape(tuple(val.shape), conv, val.dtype))
    except Exception:  # metadata is best effort: a missing value only loses cost figures, never correctness
        return None


def _empty_like_val(val: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``val.new_empty(shape)`` (contiguous, ``val``'s dtype, device and fake mode), without the fake-mode dispatch.

    A FakeTensor is built directly around a meta tensor in ``val``'s fake mode - the same tensor ``new_empty``
    returns, about ten times faster; anything else (a real or meta tensor, symbolic sizes) goes through ``new_empty``.

    >>> from fxrewrite.graph.shapes import fake_mode
    >>> val = fake_mode().from_tensor(torch.empty(2, 3, 4, 4, dtype=torch.float64, memory_format=torch.channels_last))
    >>> fast, slow = _empty_like_val(val, (2, 5, 4, 4)), val.new_empty((2, 5, 4, 4))
    >>> [(type(t).__name__, tuple(t.shape), t.stride(), t.dtype, t.device, t.fake_mode is val.fake_mode)
    ...  for t in (fast, slow)] == 2 * [("FakeTensor", (2, 5, 4, 4), (80, 16, 4, 1), torch.float64, val.device, True)]
    True
    """
    if type(val) is FakeTensor and all(type(d) is int for d in shape):
        out = FakeTensor(val.fake_mode, torch.empty(shape, dtype=val.dtype, device="meta"), val.device)
        if out.device == val.device and out.dtype == val.dtype:
            return out
    return val.new_empty(shape)


def replace_conv(gm: torch.fx.GraphModule, node: torch.fx.Node, replacement: nn.Module,
                 provenance: Mapping[str, Any]) -> list[torch.fx.Node]:
    """Replace the convolution at ``node`` by ``replacement`` (Conv2d or Sequential); returns the new nodes.

    A module site keeps its qualified name; a functional site gets a new submodule named after the node and its
    constant weight/bias attributes are dropped when nothing else reads them.
    """
    if node.op == "call_module":
        qualname = str(node.target)
        input_node = node.args[0] if node.args else node.kwargs["input"]
    else:
        qualname = _unique_attr(gm, f"{node.name}_conv")
        input_node = node.args[0] if node.args else node.kwargs["input"]
    _set_submodule(gm, qualname, replacement)
    children = list(replacement.named_children()) if isinstance(replacement, nn.Sequential) else [("", replacement)]
    new_nodes: list[torch.fx.Node] = []
    current: Any = input_node
    with gm.graph.inserting_before(node):
        for child_name, child in children:
            target = f"{qualname}.{child_name}" if child_name else qualname
            new = gm.graph.call_module(target, (current,))
            new.meta[PROVENANCE_KEY] = dict(provenance)
            last = len(new_nodes) == len(children) - 1
            if not (last and "val" in node.meta):  # the last node takes the site's own value below
                val = _conv_val(current.meta.get("val") if isinstance(current, torch.fx.Node) else None, child)
                if val is not None:
                    new.meta["val"] = val
            new_nodes.append(new)
            current = new
    if "val" in node.meta:
        new_nodes[-1].meta["val"] = node.meta["val"]
    node.replace_all_uses_with(new_nodes[-1])
    old_inputs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    gm.graph.erase_node(node)
    for attr_node in old_inputs:
        if not attr_node.users:
            target = str(attr_node.target)
            gm.graph.erase_node(attr_node)
            if not gm.graph.find_nodes(op="get_attr", target=target):
                _delete_attr(gm, target)
    return new_nodes


def _delete_attr(gm: torch.fx.GraphModule, qualname: str) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = operator.attrgetter(parent_name)(gm) if parent_name else gm
    if hasattr(parent, leaf):
        delattr(parent, leaf)


def set_conv_weight(gm: torch.fx.GraphModule, qualname: str, weight: torch.Tensor) -> None:
    """Give the Conv2d at ``qualname`` a new weight Parameter with the old one's dtype, device, requires_grad and
    memory format (channels_last stays channels_last)."""
    conv = submodule(gm, qualname)
    assert isinstance(conv, nn.Conv2d)
    old = conv.weight
    new = weight.detach().to(dtype=old.dtype, device=old.device)
    if old.dim() == 4 and old.is_contiguous(memory_format=torch.channels_last) and not old.is_contiguous():
        new = new.contiguous(memory_format=torch.channels_last)
    else:
        new = new.contiguous()
    conv.weight = nn.Parameter(new, requires_grad=old.requires_grad)


def permute_channels(gm: torch.fx.GraphModule, qualname: str, *, out_perm: torch.Tensor | None = None,
                     in_perm: torch.Tensor | None = None) -> None:
    """Reorder a module's channels: it then reads input channel ``in_perm[k]`` at ``k`` and writes output channel
    ``out_perm[k]`` at ``k``. A dense Conv2d takes ``weight[out_perm][:, in_perm]`` and ``bias[out_perm]``; a
    channel-wise module (BatchNorm2d, PReLU, a depthwise Conv2d with one output per channel) takes ``out_perm`` on
    every per-channel tensor. New tensors replace the old ones (nothing is written in place), keeping Parameter /
    buffer kind, requires_grad, dtype, device and a conv weight's memory format."""
    module = submodule(gm, qualname)
    dense = isinstance(module, nn.Conv2d) and module.groups == 1
    channelwise = isinstance(module, nn.BatchNorm2d | nn.PReLU) or (
        isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels)
    if not dense and not (channelwise and in_perm is None):
        raise ValueError(f"{qualname}: {type(module).__name__} cannot absorb a channel permutation"
                         + (" of its input (it is channel-wise: permute its output)" if channelwise else ""))
    if dense and in_perm is not None:
        set_conv_weight(gm, qualname, module.weight.detach()[:, in_perm.to(module.weight.device)])
    if out_perm is None:
        return
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    for name, old in tensors:
        if name == "num_batches_tracked":
            continue
        new = old.detach()[out_perm.to(old.device)]
        if isinstance(module, nn.Conv2d) and name == "weight":
            set_conv_weight(gm, qualname, new)
        elif name in module._parameters:
            setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, name, new)


def insert_op_before(gm: torch.fx.GraphModule, consumer: torch.fx.Node, producer: torch.fx.Node,
                     fn: Callable[..., Any], args: tuple[Any, ...], provenance: Mapping[str, Any]) -> torch.fx.Node:
    """Insert ``fn(producer, *args)`` on the edge producer -> consumer only (other users keep the producer)."""
    with gm.graph.inserting_before(consumer):
        new = gm.graph.call_function(fn, (producer, *args))
    new.meta[PROVENANCE_KEY] = dict(provenance)
    if "val" in producer.meta:
        new.meta["val"] = producer.meta["val"]
    consumer.replace_input_with(producer, new)
    return new


def _method_val(val: Any, method: str, args: tuple[Any, ...]) -> Any:
    """Shape metadata of ``val.method(*args)`` (None when unknown); FakeTensors compute it without real data."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        return getattr(val, method)(*args)
    except Exception:  # metadata is best effort, as in _conv_val
        return None


def insert_methods_before(gm: torch.fx.GraphModule, consumer: torch.fx.Node, producer: torch.fx.Node,
                          steps: Sequence[tuple[str, tuple[Any, ...]]], provenance: Mapping[str, Any]
                          ) -> torch.fx.Node:
    """Insert the chain ``producer.m1(*a1).m2(*a2)...`` on the edge producer -> consumer only; returns its last node.

    Plain tensor-method nodes (``unflatten``, ``transpose``, ``flatten``, ...) keep ``gm.code`` readable and the
    saved module free of any fxrewrite import. Other users of ``producer`` are untouched.
    """
    current = producer
    val = producer.meta.get("val")
    with gm.graph.inserting_before(consumer):
        for method, args in steps:
            current = gm.graph.call_method(method, (current, *args))
            current.meta[PROVENANCE_KEY] = dict(provenance)
            val = _method_val(val, method, args)
            if val is not None:
                current.meta["val"] = val
    consumer.replace_input_with(producer, current)
    return current


def reroute_input(consumer: torch.fx.Node, old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Make ``consumer`` read ``new`` where it read ``old`` (``new`` must come before ``consumer``)."""
    consumer.replace_input_with(old, new)


def portable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Forget fxrewrite's tracer class so that a pickled ``gm`` (``torch.save(gm)``) loads without fxrewrite.

    A GraphModule remembers the tracer that built it and pickles it by reference; on load torch only uses it to
    re-trace the generated code with every submodule as a leaf, which torch's own ``Tracer`` does the same way.
    """
    tracer = getattr(gm, "_tracer_cls", None)
    if tracer is not None and str(getattr(tracer, "__module__", "")).split(".")[0] == "fxrewrite":
        gm._tracer_cls = None
    if getattr(gm.graph, "_tracer_cls", None) is tracer and tracer is not None:
        gm.graph._tracer_cls = None
    return gm


@contextlib.contextmanager
def caller_recompiles() -> Iterator[None]:
    """Within this block ``finalize`` does not lint or recompile: the caller promises to do both after the pass."""
    token = _CALLER_RECOMPILES.set(True)
    try:
        yield
    finally:
        _CALLER_RECOMPILES.reset(token)


def finalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Lint, drop submodules no node calls any more, and recompile: the end of every modifying pass (lint and
    recompile are left to the caller inside :func:`caller_recompiles`)."""
    deferred = _CALLER_RECOMPILES.get()
    if not deferred:
        gm.graph.lint()
    gm.delete_all_unused_submodules()
    if not deferred:
        gm.recompile()
    return portable(gm)
