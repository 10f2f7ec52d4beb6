"""ExportedProgram input: rewrite the ATen-level convolutions of a ``torch.export`` program, return a new program.

An export pipeline that already runs ``torch.export`` hands fxrewrite an ``ExportedProgram``; ``rewrite_exported``
rewrites it and returns an ``ExportedProgram`` that runs, re-exports and saves (``torch.export.save``).

Approach (deliberately simple):

1. ``ep.module()`` unlifts the program into a GraphModule whose parameters are attributes at their original
   qualified names (``layer1.0.conv1.weight``) and whose convolutions are ``aten.conv2d`` / ``aten.convolution``
   calls.
2. ``to_conv_modules`` turns each 2-D, non-transposed ATen convolution whose weight (and bias) is a *parameter* of
   the program into a ``call_module`` of a plain ``nn.Conv2d`` at the weight's owner name (``layer1.0.conv1``),
   holding the very same Parameter objects. Site names and state_dict keys therefore equal the eager model's, so a
   plan recorded here replays on the eager model (``fxrewrite.io.replay.apply_plan``) and vice versa. Each
   inference-mode ATen batch norm (``aten.batch_norm`` with ``training=False``, or the decomposed
   ``aten._native_batch_norm_legit_no_training`` and its ``getitem``) on a 4-D input whose weight, bias and
   running statistics are the attributes of one submodule becomes a ``call_module`` of an ``nn.BatchNorm2d`` (in
   eval mode) at that name holding the same tensors, so ``grouped{permute=true}`` folds channel permutations
   through it as on the eager model (``fxrewrite.graph.coupling`` knows the ATen activations, adds, pools and
   means around it).
3. The ordinary fxrewrite pipeline (``fxrewrite.frontends.api.rewrite``) rewrites that GraphModule.
4. ``torch.export.export(rewritten, example_inputs)`` re-exports it.

Limits: a convolution is left untouched (listed in the report's context under ``exported_program``) when its weight
is a buffer, a constant or computed in the graph, when its weight is read by several nodes (tied weights), or when
the weight's owner holds anything besides ``weight``/``bias``. A batch norm stays an ATen op (listed under
``exported_program.batch_norms``; a channel permutation then stops there) when the program was exported in training
mode, when it is 1-D or 3-D or shared (its tensors read by several nodes), when its tensors are not the
``weight``/``bias``/``running_mean``/``running_var`` of one submodule holding nothing else, or when the saved
statistics that the decomposed op also returns are read. The result is re-exported with static shapes unless
``dynamic_shapes`` is given. Conv1d/Conv3d and transposed convolutions are never sites.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
>>> x = torch.randn(1, 3, 16, 16)
>>> result = rewrite_exported(torch.export.export(model, (x,)), (x,), "depthwise-separable{rank=exact}")
>>> isinstance(result.module, torch.export.ExportedProgram)
True
>>> torch.testing.assert_close(result.module.module()(x), model(x), atol=1e-5, rtol=1e-4)
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError

aten = torch.ops.aten
CONV_OPS = (aten.conv2d.default, aten.conv2d.padding, aten.convolution.default)
#: ATen batch norms: their argument names, and whether they return a tuple (output, saved statistics...)
BATCH_NORM_OPS: Mapping[Any, tuple[tuple[str, ...], bool]] = {
    aten.batch_norm.default: (("input", "weight", "bias", "running_mean", "running_var", "training", "momentum",
                               "eps", "cudnn_enabled"), False),
    aten.native_batch_norm.default: (("input", "weight", "bias", "running_mean", "running_var", "training",
                                      "momentum", "eps"), True),
    aten._native_batch_norm_legit_no_training.default: (("input", "weight", "bias", "running_mean", "running_var",
                                                         "momentum", "eps"), True),
}


@dataclass(frozen=True)
class Conversion:
    """What ``to_conv_modules`` did: the ATen convolutions it turned into modules (node name -> module name) and
    those it left alone with the reason; the same for the ATen batch norms."""

    converted: Mapping[str, str]
    not_converted: Mapping[str, str]
    batch_norms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    batch_norms_not_converted: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"converted": dict(self.converted), "not_converted": dict(self.not_converted),
                "batch_norms": {"converted": dict(self.batch_norms),
                                "not_converted": dict(self.batch_norms_not_converted)}}


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    items = [int(v) for v in value]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def _conv_args(node: torch.fx.Node) -> dict[str, Any] | str:
    """The bound arguments of an ATen convolution node, or why it is not a 2-D forward convolution."""
    if node.target is aten.convolution.default:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                 "groups")
        bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
        if bound.get("transposed"):
            return "transposed convolution"
        if any(int(p) for p in bound.get("output_padding", ())):
            return "output_padding is set"
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        bound = defaults | dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return bound


def _attr_target(arg: Any) -> str | None:
    return str(arg.target) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else None


def _attr_uses(gm: torch.fx.GraphModule) -> Counter[str]:
    """How many nodes read each attribute (over all its ``get_attr`` nodes)."""
    uses: Counter[str] = Counter()
    for node in gm.graph.find_nodes(op="get_attr"):
        uses[str(node.target)] += len(node.users)
    return uses


def _why_not(gm: torch.fx.GraphModule, bound: dict[str, Any], parameters: set[str], uses: Counter[str]
             ) -> str | None:
    weight_name = _attr_target(bound["weight"])
    if weight_name is None or weight_name not in parameters:
        return "the weight is not a parameter of the program (buffer, constant or computed)"
    if getattr(bound["weight"].meta.get("val"), "ndim", 4) != 4:
        return "not a 2-D convolution"
    if uses[weight_name] > 1:
        return f"weight {weight_name!r} is used by more than one node (tied weights)"
    owner_name, _, leaf = weight_name.rpartition(".")
    if not owner_name or leaf != "weight":
        return f"weight {weight_name!r} is not the 'weight' attribute of a submodule"
    bias = bound.get("bias")
    if bias is not None:
        bias_name = _attr_target(bias)
        if bias_name != f"{owner_name}.bias" or bias_name not in parameters or len(bias.users) > 1:
            return "the bias is not the parameter 'bias' of the weight's owner"
    owner = gm.get_submodule(owner_name)
    extra = set(owner._parameters) - {"weight", "bias"}
    if extra or owner._buffers or owner._modules or (bias is None and owner._parameters.get("bias") is not None):
        return f"submodule {owner_name!r} holds more than this convolution's weight and bias"
    if not all(isinstance(bound[k], int | list | tuple | str) for k in ("stride", "padding", "dilation", "groups")):
        return "stride/padding/dilation/groups are computed in the graph"
    return None


def _bn_args(node: torch.fx.Node) -> dict[str, Any] | str:
    """The bound arguments of an ATen batch norm node, or why it is not an inference-mode batch norm."""
    names, returns_tuple = BATCH_NORM_OPS[node.target]
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if bound.get("training", False) is not False:
        return "batch norm in training mode (batch statistics)"
    if returns_tuple:
        items = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem for u in items):
            return "its output tuple is read as a whole"
        if any(u.args[1] != 0 and u.users for u in items):
            return "its saved statistics (tuple items 1, 2) are read"
        bound["outputs"] = [u for u in items if u.args[1] == 0]
        if not bound["outputs"]:
            return "its output is not read"
    else:
        bound["outputs"] = [node]
    return bound


def _bn_why_not(gm: torch.fx.GraphModule, bound: dict[str, Any], parameters: set[str], uses: Counter[str]
                ) -> str | None:
    mean_name = _attr_target(bound.get("running_mean")) or ""
    owner_name, _, leaf = mean_name.rpartition(".")
    var_name = f"{owner_name}.running_var"
    if not owner_name or leaf != "running_mean" or _attr_target(bound.get("running_var")) != var_name:
        return "the running statistics are not the attributes 'running_mean' / 'running_var' of one submodule"
    if getattr(bound["input"].meta.get("val"), "ndim", None) != 4:
        return "not a 2-D batch norm (its input is not 4-D)"
    weight, bias = bound.get("weight"), bound.get("bias")
    params = (f"{owner_name}.weight", f"{owner_name}.bias") if weight is not None or bias is not None else ()
    if (_attr_target(weight), _attr_target(bias)) != (params or (None, None)) or not set(params) <= parameters:
        return f"weight and bias are not the parameters 'weight' and 'bias' of {owner_name!r}"
    if any(uses[name] > 1 for name in (mean_name, var_name, *params)):
        return f"the tensors of {owner_name!r} are used by more than one node (a shared batch norm)"
    owner = gm.get_submodule(owner_name)
    stats = {"running_mean", "running_var"}
    if (set(owner._parameters) != ({"weight", "bias"} if params else set()) or owner._modules
            or not stats <= set(owner._buffers) <= stats | {"num_batches_tracked"}):
        return f"submodule {owner_name!r} holds more than this batch norm's parameters and running statistics"
    if not isinstance(bound.get("eps"), float | int) or not isinstance(bound.get("momentum"), float | int | None):
        return "eps / momentum are computed in the graph"
    return None


def _install(gm: torch.fx.GraphModule, node: torch.fx.Node, owner_name: str, module: nn.Module, source: Any,
             outputs: list[torch.fx.Node]) -> None:
    """Put ``module`` at ``owner_name`` and let one ``call_module`` of it on ``source`` stand for ``outputs`` (the
    node's result, or its tuple's items); erase the node, its items and the attributes nothing else reads."""
    parent_name, _, leaf = owner_name.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, leaf, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(owner_name, (source,))
    new.meta.update(outputs[0].meta)
    for output in outputs:
        output.replace_all_uses_with(new)
    attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
    for item in list(node.users):  # a tuple's items, none read any more
        gm.graph.erase_node(item)
    gm.graph.erase_node(node)
    for attr in attrs:
        if not attr.users:
            gm.graph.erase_node(attr)


def to_conv_modules(gm: torch.fx.GraphModule, parameters: set[str]) -> Conversion:
    """In place: replace eligible ATen convolution and batch norm nodes of ``gm`` by ``call_module`` of
    ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules that share the original Parameters and buffers (see the module
    docstring for which are eligible)."""
    uses = _attr_uses(gm)
    converted, skipped = _convert(gm, CONV_OPS, _conv_args, lambda b: _why_not(gm, b, parameters, uses),
                                  lambda b: _conv_module(gm, b))
    batch_norms, bn_skipped = _convert(gm, BATCH_NORM_OPS, _bn_args, lambda b: _bn_why_not(gm, b, parameters, uses),
                                       lambda b: _batch_norm_module(gm, b))
    gm.graph.lint()
    gm.recompile()
    return Conversion(converted, skipped, batch_norms, bn_skipped)


def _convert(gm: torch.fx.GraphModule, ops: Collection[Any], bind: Callable[[torch.fx.Node], dict[str, Any] | str],
             why_not: Callable[[dict[str, Any]], str | None], build: Callable[[dict[str, Any]], tuple[str, nn.Module]]
             ) -> tuple[dict[str, str], dict[str, str]]:
    """Replace each ``ops`` node that ``bind`` and ``why_not`` accept by a call of the module ``build`` makes (at the
    owner's name); returns the converted (node -> module name) and the skipped nodes (node -> reason)."""
    converted: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]:
        bound = bind(node)
        reason = bound if isinstance(bound, str) else why_not(bound)
        if reason is not None:
            skipped[node.name] = reason
            continue
        assert isinstance(bound, dict)
        owner_name, module = build(bound)
        _install(gm, node, owner_name, module, bound["input"], bound.get("outputs", [node]))
        converted[node.name] = owner_name
    return converted, skipped


def _conv_module(gm: torch.fx.GraphModule, bound: dict[str, Any]) -> tuple[str, nn.Conv2d]:
    """The ``nn.Conv2d`` for an accepted ATen convolution, holding the owner's Parameter objects."""
    owner_name = str(bound["weight"].target).rpartition(".")[0]
    owner = gm.get_submodule(owner_name)
    weight = owner._parameters["weight"]
    assert weight is not None
    groups = int(bound["groups"])
    padding = bound["padding"] if isinstance(bound["padding"], str) else _pair(bound["padding"])
    conv = nn.Conv2d(int(weight.shape[1]) * groups, int(weight.shape[0]), _pair(weight.shape[2:]),
                     _pair(bound["stride"]), padding, _pair(bound["dilation"]), groups,
                     bias=bound.get("bias") is not None, device="meta", dtype=weight.dtype)
    conv.weight = weight  # the same Parameter objects: nothing is copied
    conv.bias = owner._parameters.get("bias") if bound.get("bias") is not None else None
    conv.train(gm.training)
    return owner_name, conv


def _batch_norm_module(gm: torch.fx.GraphModule, bound: dict[str, Any]) -> tuple[str, nn.BatchNorm2d]:
    """The ``nn.BatchNorm2d`` for an accepted ATen batch norm, in eval mode as the program's op (recorded with
    ``training=False``) is, holding the owner's Parameter and buffer objects (state_dict keys stay the owner's)."""
    owner_name = str(bound["running_mean"].target).rpartition(".")[0]
    owner = gm.get_submodule(owner_name)
    mean = owner._buffers["running_mean"]
    assert mean is not None
    bn = nn.BatchNorm2d(int(mean.shape[0]), float(bound["eps"]), bound["momentum"],
                        affine=bound.get("weight") is not None, device="meta", dtype=mean.dtype)
    bn.weight, bn.bias = owner._parameters.get("weight"), owner._parameters.get("bias")
    bn.running_mean, bn.running_var = mean, owner._buffers["running_var"]
    bn.num_batches_tracked = owner._buffers.get("num_batches_tracked")
    bn._non_persistent_buffers_set = set(owner._non_persistent_buffers_set)
    bn.eval()
    return owner_name, bn


def _example_inputs(ep: torch.export.ExportedProgram, example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, tuple | list):
            raise ConfigError("example_inputs must be a tuple of positional inputs, as for torch.export: "
                              "write (x,) instead of x.")
        return tuple(example_inputs)
    stored = getattr(ep, "example_inputs", None)
    if not stored or stored[1]:
        raise ConfigError("this ExportedProgram carries no positional example inputs; pass example_inputs=(x,) "
                          "with the shapes it was exported with.")
    return tuple(stored[0])


def rewrite_exported(ep: torch.export.ExportedProgram, example_inputs: Any = None, passes: Any = None, *,
                     select: Any = None, dynamic_shapes: Any = None, strict: bool = False, **options: Any) -> Any:
    """Rewrite the convolutions of ``ep`` with ``passes``; returns ``RewriteResult(ExportedProgram, report)``.

    ``example_inputs`` default to the ones stored in the program. ``dynamic_shapes`` and ``strict`` are passed to
    the re-export; other keyword arguments (``verify``, ``rtol``, ``atol``, ``batches``, ``latency``) go to
    ``fxrewrite.rewrite``. The input program is not modified.
    """
    from fxrewrite.frontends.pipeline import rewrite_graph
    if not isinstance(ep, torch.export.ExportedProgram):
        raise ConfigError(f"expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    inputs = _example_inputs(ep, example_inputs)
    gm = ep.module()
    conversion = to_conv_modules(gm, set(ep.graph_signature.parameters))
    result = rewrite_graph(gm, inputs, passes, select=select, **options)
    try:
        new_ep = torch.export.export(result.module, inputs, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:
        raise ConfigError(f"re-exporting the rewritten program failed: {exc}; the rewritten GraphModule runs "
                          "eagerly - check dynamic_shapes= against the program's input specs.") from exc
    context = dict(result.report.context) | {"model": "ExportedProgram", "exported_program": conversion.to_dict()}
    report = dataclasses.replace(result.report, context=context)
    return dataclasses.replace(result, module=new_ep, report=report)
