"""Analytic cost model for ``torch.fx`` graphs: parameters, MACs and activation bytes.

Costs are computed from shape metadata only -- no second trace and no real compute.  Every node the
model needs must carry ``node.meta["val"]`` (a ``FakeTensor``, a tuple/list/dict of them or a
non-tensor), as set by shape propagation or by ``torch.export`` (ATen-level graphs are supported too)::

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)

(the mode flag lets the real parameters meet fake activations).

Units (also in :data:`UNITS`):

* ``macs``: multiply-accumulates; 1 MAC = one multiply-add; bias adds are not counted.
* ``flops``: 2 x MACs.
* ``params``: number of parameter elements (buffers are not counted; shared/tied parameters once).
* ``activation_bytes``: bytes of node outputs (``numel * element_size``); views are not de-aliased.

Only convolutions, linear layers, matrix products and attention are counted in MACs.  Batch norm,
layer norm, pooling, activations, elementwise ops, softmax etc. are kind ``"other"`` with 0 MACs, so
the totals match ``fvcore`` / ``FlopCounterMode`` restricted to conv + linear + matmul (+ attention).

Formulas (``numel`` = number of elements, ``prod`` = product):

* conv (``nn.Conv{1,2,3}d``, ``F.conv*``, ``aten.convolution``):
  ``numel(output) * (in_channels / groups) * prod(kernel)``.
* transposed conv: ``numel(input) * (out_channels / groups) * prod(kernel)``.
* linear: ``numel(output) * in_features``.
* matmul / mm / bmm / addmm / baddbmm: ``numel(output) * K`` (K the contracted size).
* einsum: product of the sizes of all indices (exact for one- and two-operand contractions; the
  naive-loop upper bound for three or more operands, whatever contraction order torch picks).
* scaled_dot_product_attention with q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)``:
  ``prod(q.shape[:-1]) * S * (E + Ev)`` (QK^T plus AV; softmax and scaling not counted, no causal
  discount).
* ``nn.MultiheadAttention`` leaf, batch ``N``, target length ``L``, source length ``S``, embed ``E``:
  ``N*L*E*E`` (q proj) + ``N*S*kdim*E`` (k proj) + ``N*S*vdim*E`` (v proj) + ``2*N*L*S'*E``
  (QK^T and AV, ``S' = S + bias_k + add_zero_attn``) + ``N*L*E*E`` (out proj).

Example:
    >>> import torch
    >>> from torch._subclasses.fake_tensor import FakeTensorMode
    >>> from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    >>> gm = torch.fx.symbolic_trace(model)
    >>> mode = FakeTensorMode(allow_non_fake_inputs=True)  # real parameters, fake activations
    >>> _ = FakeTensorProp(gm, mode).propagate(torch.randn(1, 3, 16, 16))
    >>> cost = model_cost(gm)
    >>> cost.macs, cost.flops, cost.params
    (55296, 110592, 224)
    >>> cost.by_kind()["conv"]
    55296
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from fxrewrite.util.runtime import submodule

__all__ = [
    "KINDS",
    "UNITS",
    "ModelCost",
    "NodeCost",
    "conv_macs",
    "model_cost",
    "node_macs",
]

UNITS: dict[str, str] = {
    "macs": "multiply-accumulates (1 MAC = one multiply-add; bias not counted)",
    "flops": "2 x MACs",
    "params": "elements",
    "activation_bytes": "bytes of node outputs",
}

#: Every kind a :class:`NodeCost` can have.
KINDS: tuple[str, ...] = ("conv", "linear", "matmul", "attention", "other")

_NO_OUTPUT_OPS = ("placeholder", "output", "get_attr")

aten = torch.ops.aten

# call_function targets (Python-level and ATen overload packets); values are handled below.
_CONV_FNS: set[Any] = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_T_FNS: set[Any] = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_CONV_PACKETS: set[Any] = {aten.conv1d, aten.conv2d, aten.conv3d}
_CONV_T_PACKETS: set[Any] = {aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d}
_CONV_GENERIC_PACKETS: set[Any] = {aten.convolution, aten._convolution}  # ``transposed`` is args[6]
_LINEAR_FNS: set[Any] = {F.linear, aten.linear}
# matmul-like ops whose first matrix operand is args[0] ...
_MM_FIRST: set[Any] = {
    torch.matmul,
    operator.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    aten.matmul,
    aten.mm,
    aten.bmm,
}
# ... and the ``add*`` variants whose first matrix operand is args[1] (args[0] is the added term).
_MM_SECOND: set[Any] = {
    torch.addmm,
    torch.Tensor.addmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
    aten.addmm,
    aten.baddbmm,
}
_ADDBMM: set[Any] = {torch.addbmm, torch.Tensor.addbmm, aten.addbmm}
_EINSUM: set[Any] = {torch.einsum, aten.einsum}
_SDPA: set[Any] = {
    F.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_flash_attention_for_cpu,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
}
_FN_MM_KINDS: dict[Any, str] = {
    **dict.fromkeys(_MM_FIRST, "mm_first"),
    **dict.fromkeys(_MM_SECOND, "mm_second"),
    **dict.fromkeys(_ADDBMM, "addbmm"),
}
_METHOD_KINDS: dict[str, str] = {
    "matmul": "mm_first",
    "__matmul__": "mm_first",
    "mm": "mm_first",
    "bmm": "mm_first",
    "addmm": "mm_second",
    "baddbmm": "mm_second",
    "addbmm": "addbmm",
}


@dataclass(frozen=True)
class NodeCost:
    """Cost of one fx node.

    ``params`` counts parameter elements first used by this node (each parameter once model-wide);
    ``activation_bytes`` is the size of the node's output tensors (0 for placeholder/get_attr/output).

    Example:
        >>> NodeCost("fc", "fc", "linear", params=30, macs=20, activation_bytes=8).macs
        20
    """

    node: str
    target: str
    kind: str
    params: int
    macs: int
    activation_bytes: int


@dataclass(frozen=True)
class ModelCost:
    """Per-node costs plus totals (units in :data:`UNITS`).

    Example:
        >>> nc = NodeCost("fc", "fc", "linear", params=30, macs=20, activation_bytes=8)
        >>> c = ModelCost((nc,), params=30, macs=20, activation_bytes=8)
        >>> c.flops, c.by_kind()["linear"]
        (40, 20)
    """

    nodes: tuple[NodeCost, ...]
    params: int
    macs: int
    activation_bytes: int

    def by_kind(self) -> dict[str, int]:
        """MACs summed per kind; every kind in :data:`KINDS` is present (possibly 0)."""
        out = dict.fromkeys(KINDS, 0)
        for nc in self.nodes:
            out[nc.kind] = out.get(nc.kind, 0) + nc.macs
        return out

    @property
    def flops(self) -> int:
        """Floating point operations, ``2 * macs``."""
        return 2 * self.macs


# --------------------------------------------------------------------------------------------- helpers


def _int(d: Any) -> int:
    if isinstance(d, torch.SymInt):
        hint = getattr(d.node, "hint", None)
        if hint is None:
            raise ValueError(f"symbolic size {d} has no concrete hint")
        return int(hint)
    return int(d)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(_int(d) for d in t.shape)


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _node_desc(node: torch.fx.Node) -> str:
    return f"node {node.name!r} ({node.op} {_target_str(node)})"


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _val(gm: torch.fx.GraphModule, arg: Any, user: torch.fx.Node) -> Any:
    """Shape-carrying value of an argument: ``meta["val"]``, or the real attribute for ``get_attr``."""
    if isinstance(arg, torch.fx.Node):
        if "val" in arg.meta:
            return arg.meta["val"]
        if arg.op == "get_attr":
            return _fetch_attr(gm, str(arg.target))
        raise ValueError(
            f"{_node_desc(arg)} has no meta['val'] (needed by {_node_desc(user)}); "
            "run shape propagation first, e.g. FakeTensorProp"
        )
    return arg


def _tensor(gm: torch.fx.GraphModule, arg: Any, user: torch.fx.Node) -> torch.Tensor:
    v = _val(gm, arg, user)
    if isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor):
        v = v[0]  # multi-output ops (e.g. flash attention): the first output is the result
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"expected a tensor value for an argument of {_node_desc(user)}, got {type(v)}")
    return v


def _out(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    return _tensor(gm, node, node)


def _arg(node: torch.fx.Node, index: int, *names: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    raise ValueError(f"{_node_desc(node)}: missing argument {names[0]!r} (position {index})")


def _target_str(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    try:
        return _get_qualified_name(t)
    except Exception:  # pragma: no cover - exotic callables
        return getattr(t, "__name__", str(t))


def _tensors(val: Any) -> Iterable[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        yield val
    elif isinstance(val, (tuple, list)):
        for v in val:
            yield from _tensors(v)
    elif isinstance(val, dict):
        for v in val.values():
            yield from _tensors(v)


def _bytes(val: Any) -> int:
    return sum(_numel(_shape(t)) * t.element_size() for t in _tensors(val))


# ------------------------------------------------------------------------------------------ formulas


def conv_macs(
    output_shape: Sequence[int], in_channels: int, groups: int, kernel_size: tuple[int, ...]
) -> int:
    """MACs of a (non-transposed) convolution: ``numel(output) * (in_channels / groups) * prod(kernel)``.

    Example:
        >>> conv_macs((1, 8, 16, 16), in_channels=4, groups=2, kernel_size=(3, 3))
        36864
    """
    if groups <= 0 or in_channels % groups:
        raise ValueError(f"in_channels={in_channels} is not divisible by groups={groups}")
    return _numel(_int(d) for d in output_shape) * (in_channels // groups) * _numel(kernel_size)


def _conv_fn_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, transposed: bool) -> int:
    w = _shape(_tensor(gm, _arg(node, 1, "weight"), node))
    if transposed:  # weight (in, out/groups, *k)
        return _numel(_shape(_tensor(gm, _arg(node, 0, "input"), node))) * _numel(w[1:])
    return _numel(_shape(_out(gm, node))) * _numel(w[1:])  # weight (out, in/groups, *k)


def _mm_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, index: int) -> int:
    """``numel(output) * K`` with K the last dim of the first matrix operand (``args[index]``)."""
    names = ("input", "self") if index == 0 else ("mat1", "batch1")
    a = _shape(_tensor(gm, _arg(node, index, *names), node))
    return _numel(_shape(_out(gm, node))) * (a[-1] if a else 1)


def _einsum_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    args = list(node.args)
    # einsum(eq, a, b), einsum(eq, [a, b]) and aten.einsum(eq, [a, b], path)
    if args and isinstance(args[0], str):
        equation = args[0]
        operands = list(args[1]) if len(args) > 1 and isinstance(args[1], (list, tuple)) else args[1:]
    else:  # sublist format: einsum(a, [0, 1], b, [1, 2], [0, 2])
        letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        pairs = len(args) // 2
        operands = args[0 : 2 * pairs : 2]
        equation = ",".join(
            "".join("..." if i is Ellipsis else letters[i] for i in sub) for sub in args[1 : 2 * pairs : 2]
        )
    lhs = equation.replace(" ", "").split("->")[0]
    sizes: dict[str, int] = {}
    ellipsis_shapes: list[tuple[int, ...]] = []
    for term, op in zip(lhs.split(","), operands, strict=True):
        shape = _shape(_tensor(gm, op, node))
        if "..." in term:
            head, tail = term.split("...")
            n_ell = len(shape) - len(head) - len(tail)
            ellipsis_shapes.append(shape[len(head) : len(head) + n_ell])
            dims = [
                *zip(head, shape[: len(head)], strict=True),
                *zip(tail, shape[len(head) + n_ell :], strict=True),
            ]
        else:
            dims = list(zip(term, shape, strict=True))
        for letter, size in dims:
            sizes[letter] = max(sizes.get(letter, 1), size)
    ell = torch.broadcast_shapes(*ellipsis_shapes) if ellipsis_shapes else ()
    return _numel(sizes.values()) * _numel(ell)


def _sdpa_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int:
    q = _shape(_tensor(gm, _arg(node, 0, "query"), node))
    k = _shape(_tensor(gm, _arg(node, 1, "key"), node))
    v = _shape(_tensor(gm, _arg(node, 2, "value"), node))
    return _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _mha_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, mod: nn.MultiheadAttention) -> int:
    q = _shape(_tensor(gm, _arg(node, 0, "query"), node))
    k = _shape(_tensor(gm, _arg(node, 1, "key"), node))
    if len(q) == 2:  # unbatched (L, E)
        n, tgt, src = 1, q[0], k[0]
    elif mod.batch_first:
        n, tgt, src = q[0], q[1], k[1]
    else:
        n, tgt, src = q[1], q[0], k[0]
    e = mod.embed_dim
    src_eff = src + (mod.bias_k is not None) + bool(mod.add_zero_attn)
    proj = n * tgt * e * e + n * src * mod.kdim * e + n * src * mod.vdim * e + n * tgt * e * e
    return proj + 2 * n * tgt * src_eff * e


def node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module | None = None) -> tuple[str, int]:
    """``(kind, macs)`` of one node; kind is one of :data:`KINDS`, ``("other", 0)`` if not counted. ``module``: the
    module a ``call_module`` node calls, when the caller has it already.

    Example:
        >>> import torch
        >>> from torch._subclasses.fake_tensor import FakeTensorMode
        >>> from torch.fx.passes.fake_tensor_prop import FakeTensorProp
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 5)))
        >>> _ = FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(torch.randn(2, 4))
        >>> [node_macs(gm, n) for n in gm.graph.nodes]
        [('other', 0), ('linear', 40), ('other', 0)]
    """
    if node.op == "call_module":
        mod = module if module is not None else submodule(gm, str(node.target))
        if isinstance(mod, nn.modules.conv._ConvNd):
            k = tuple(mod.kernel_size)
            if mod.transposed:
                x = _shape(_tensor(gm, _arg(node, 0, "input"), node))
                return "conv", _numel(x) * (mod.out_channels // mod.groups) * _numel(k)
            return "conv", conv_macs(_shape(_out(gm, node)), mod.in_channels, mod.groups, k)
        if isinstance(mod, nn.Linear):
            return "linear", _numel(_shape(_out(gm, node))) * mod.in_features
        if isinstance(mod, nn.MultiheadAttention):
            return "attention", _mha_macs(gm, node, mod)
        return "other", 0
    if node.op == "call_method":
        how = _METHOD_KINDS.get(str(node.target))
    elif node.op == "call_function":
        t = node.target
        packet = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t
        try:
            hash(packet)
        except TypeError:  # an unhashable callable cannot be one of the known ops
            return "other", 0
        if packet in _CONV_FNS or packet in _CONV_PACKETS:
            return "conv", _conv_fn_macs(gm, node, transposed=False)
        if packet in _CONV_T_FNS or packet in _CONV_T_PACKETS:
            return "conv", _conv_fn_macs(gm, node, transposed=True)
        if packet in _CONV_GENERIC_PACKETS:
            return "conv", _conv_fn_macs(gm, node, transposed=bool(_arg(node, 6, "transposed")))
        if packet in _LINEAR_FNS:
            w = _shape(_tensor(gm, _arg(node, 1, "weight"), node))
            return "linear", _numel(_shape(_out(gm, node))) * w[-1]
        if packet in _EINSUM:
            return "matmul", _einsum_macs(gm, node)
        if packet in _SDPA:
            return "attention", _sdpa_macs(gm, node)
        how = _FN_MM_KINDS.get(packet)
    else:
        return "other", 0
    if how == "mm_first":
        return "matmul", _mm_macs(gm, node, 0)
    if how == "mm_second":
        return "matmul", _mm_macs(gm, node, 1)
    if how == "addbmm":  # addbmm(input, b1 (B, M, K), b2 (B, K, N)) -> (M, N): B*M*N*K
        b1 = _shape(_tensor(gm, _arg(node, 1, "batch1"), node))
        return "matmul", _numel(_shape(_out(gm, node))) * b1[0] * b1[-1]
    return "other", 0


def _new_params(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, nn.Parameter):
        candidates: Iterable[torch.Tensor] = (obj,)
    elif isinstance(obj, nn.Module):  # a leaf's own dict, without parameters()' walk of its (empty) tree
        candidates = obj.parameters(recurse=True) if obj._modules else (
            p for p in obj._parameters.values() if p is not None)
    else:
        return 0
    total = 0
    for p in candidates:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_cost(gm: torch.fx.GraphModule) -> ModelCost:
    """Per-node and total cost of a shape-propagated GraphModule.

    Parameters are attributed to the node that first uses them (``call_module``: the module's own
    parameters, ``get_attr`` of a parameter: that node), so the total equals
    ``sum(p.numel() for p in gm.parameters())`` when every parameter is reachable from the graph
    (always the case right after ``symbolic_trace``; after a rewrite, drop dead submodules with
    ``gm.delete_all_unused_submodules()``).  Lifted parameters of an ``ExportedProgram.graph_module``
    are placeholders and therefore not counted -- use ``ep.module()`` for parameter totals.

    Raises ``ValueError`` naming the node if ``meta["val"]`` is missing where it is needed.  A
    ``call_*`` node without ``meta["val"]`` and not needed by a MAC formula (``FakeTensorProp`` sets
    none for ops returning ``None``, e.g. ``torch._assert``) contributes 0 activation bytes.

    Example:
        >>> import torch
        >>> from torch._subclasses.fake_tensor import FakeTensorMode
        >>> from torch.fx.passes.fake_tensor_prop import FakeTensorProp
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU()))
        >>> _ = FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(torch.randn(2, 4))
        >>> c = model_cost(gm)
        >>> c.params, c.macs, c.activation_bytes, [n.kind for n in c.nodes]
        (25, 40, 80, ['other', 'linear', 'other', 'other'])
    """
    graph_nodes = list(gm.graph.nodes)
    if not any("val" in n.meta for n in graph_nodes):
        first = graph_nodes[0] if graph_nodes else None
        where = _node_desc(first) if first is not None else "empty graph"
        raise ValueError(f"{where} has no meta['val']; run shape propagation first, e.g. FakeTensorProp")
    seen: set[int] = set()
    costs: list[NodeCost] = []
    for node in graph_nodes:
        params = 0
        if node.op == "call_module":
            module = submodule(gm, str(node.target))
            kind, macs = node_macs(gm, node, module)
            params = _new_params(module, seen)
        else:
            kind, macs = node_macs(gm, node)
        if node.op == "get_attr":
            params = _new_params(_fetch_attr(gm, str(node.target)), seen)
        act = 0 if node.op in _NO_OUTPUT_OPS else _bytes(node.meta.get("val"))
        costs.append(NodeCost(node.name, _target_str(node), kind, params, macs, act))
    return ModelCost(
        nodes=tuple(costs),
        params=sum(c.params for c in costs),
        macs=sum(c.macs for c in costs),
        activation_bytes=sum(c.activation_bytes for c in costs),
    )
