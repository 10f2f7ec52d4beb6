"""The rewriter: the only code in fxrewrite that mutates a graph.

``replace_conv`` puts a replacement (a plain ``nn.Conv2d`` or an ``nn.Sequential`` of them) at the site's qualified
name, so state_dict keys stay predictable (``layer1.0.conv1.0.weight``, ``layer1.0.conv1.1.weight``) and saved
models load without fxrewrite; the Sequential's children become separate ``call_module`` nodes, so ``gm.code`` shows
each convolution and later passes see them. ``insert_op_before`` puts a function call on one input edge of a node.
New nodes carry ``node.meta["val"]`` (shape metadata, no compute) and ``node.meta["fxrewrite"]`` (provenance).

>>> import torch
>>> from torch import nn
>>> from fxrewrite.capture import trace
>>> gm = trace(nn.Sequential(nn.Conv2d(4, 4, 3)))
>>> node = next(n for n in gm.graph.nodes if n.op == "call_module")
>>> _ = replace_conv(gm, node, nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1)), {"pass": "demo"})
>>> _ = gm.recompile(); sorted(gm.state_dict())
['0.0.bias', '0.0.weight', '0.1.bias', '0.1.weight']
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

PROVENANCE_KEY = "fxrewrite"


def _set_submodule(gm: torch.fx.GraphModule, qualname: str, module: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)


def _unique_attr(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _conv_val(val: Any, conv: nn.Conv2d) -> Any:
    """Shape metadata of ``conv`` applied to a value with metadata ``val`` (None when unknown)."""
    if not isinstance(val, torch.Tensor):
        return None
    try:
        from fxrewrite.shapes import conv_output_shape
        shape = conv_output_shape(tuple(val.shape), conv)
        return val.new_empty(shape)
    except Exception:  # metadata is best effort: a missing value only loses cost figures, never correctness
        return None


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
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                _delete_attr(gm, target)
    return new_nodes


def _delete_attr(gm: torch.fx.GraphModule, qualname: str) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = operator.attrgetter(parent_name)(gm) if parent_name else gm
    if hasattr(parent, leaf):
        delattr(parent, leaf)


def set_conv_weight(gm: torch.fx.GraphModule, qualname: str, weight: torch.Tensor) -> None:
    """Replace the weight values of the Conv2d at ``qualname`` in place of its Parameter (same requires_grad)."""
    conv = gm.get_submodule(qualname)
    assert isinstance(conv, nn.Conv2d)
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


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


def finalize(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Lint, drop submodules no node calls any more, and recompile: the end of every modifying pass."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
