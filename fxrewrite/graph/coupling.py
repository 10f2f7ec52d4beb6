"""The channel-coupling graph: which tensors of a traced model must share one channel order.

Each tensor with a channel dimension (a 3-D or 4-D value, channels at ``ndim - 3``) is a *channel space*, a node of
a ``networkx.Graph``. An edge joins two spaces that any channel permutation must treat alike: the input and output
of a channel-wise op (batch norm, activations, pooling, a spatial mean, dropout, a depthwise conv with one output
per channel) and the operands and result of an elementwise op (a residual ``add``, ``mul``, ...; an operand
broadcast over channels joins nothing). A connected component is a set of spaces that must share one order.
Permuting a component by ``perm`` is exact when every op around it absorbs the permutation:

- a dense conv (groups=1) writing the component takes ``weight[perm]`` and ``bias[perm]`` (a *producer*);
- a dense conv reading it takes ``weight[:, perm]`` (a *consumer*);
- a module inside it with per-channel state (batch norm, PReLU, a depthwise conv) takes ``param[perm]``
  (*channel-wise*).

Anything else that touches a component - a model input or output, a constant, a concat, a reshape or flatten, a
grouped conv, a shared or hooked module, an op this module does not know - is a *blocker*: the component keeps its
natural order, and the blocker says why. Building the graph reads the graph and its shape metadata
(``node.meta["val"]``) only; it changes nothing.

The ATen ops of an unlifted ``torch.export`` program (``aten.relu_.default``, ``aten.add.Tensor``,
``aten.hardtanh.default``, ``aten.mean.dim``, ``aten.max_pool2d_with_indices.default`` read through ``getitem``, ...)
count as the torch functions they implement; ``frontends.exported`` turns the program's convs and batch norms into
modules first. ATen ops without a counterpart here (``aten.flatten``, ``aten.view``, ``aten.cat``, ``aten.prelu``,
an ATen batch norm that ``fxrewrite.frontends.exported`` left alone, ...) are blockers, as their torch counterparts are.

>>> import torch
>>> from torch import nn
>>> from fxrewrite.graph.capture import trace
>>> from fxrewrite.graph.shapes import propagate_shapes
>>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)))
>>> propagate_shapes(gm, (torch.randn(1, 3, 4, 4),))
>>> c = channel_coupling(gm).component("_2")
>>> c.spaces, c.producers, c.consumers, c.channelwise, c.blockers
(('_0', '_1', '_2'), ('0',), ('3',), ('1',), ())
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fxrewrite.graph.sites import find_sites, hook_counts

__all__ = ["ChannelCoupling", "Component", "channel_coupling"]

#: modules that map each channel to itself (batch norm and PReLU with per-channel state)
CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d, nn.PReLU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CHANNELWISE_FUNCTIONS: tuple[object, ...] = (
    F.relu, torch.relu, F.relu_, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu, F.elu,
    F.mish, F.softplus, F.hardtanh, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout2d,
    F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
CHANNELWISE_METHODS = ("relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "mean", "amax", "sum")
#: reductions are channel-wise when the result keeps the input's dims and channel count (spatial, keepdim=True)
REDUCTIONS: tuple[object, ...] = (torch.mean, torch.amax, torch.sum)
ELEMENTWISE_FUNCTIONS: tuple[object, ...] = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul, operator.truediv,
    torch.add, torch.sub, torch.mul, torch.div)
ELEMENTWISE_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")
SHAPE_QUERIES = ("size", "dim")

# The same ops as torch.export spells them (ATen overloads in an unlifted ``ExportedProgram.module()``; its convs and
# batch norms are modules there, see fxrewrite.frontends.exported), in the default and the decomposed (core ATen) forms.
aten = torch.ops.aten
ATEN_CHANNELWISE: tuple[object, ...] = (
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default,
    aten.silu.default, aten.silu_.default, aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
    aten.hardsigmoid_.default, aten.gelu.default, aten.gelu_.default, aten.leaky_relu.default,
    aten.leaky_relu_.default, aten.elu.default, aten.elu_.default, aten.mish.default, aten.mish_.default,
    aten.softplus.default, aten.sigmoid.default, aten.sigmoid_.default, aten.tanh.default, aten.tanh_.default,
    aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default, aten.feature_dropout_.default,
    aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool2d.default, aten.clone.default, aten.contiguous.default)
ATEN_REDUCTIONS: tuple[object, ...] = (aten.mean.dim, aten.amax.default, aten.sum.dim_IntList)
#: channel-wise ops returning (values, indices), read through ``getitem``: both items keep the input's channels
ATEN_CHANNELWISE_TUPLES: tuple[object, ...] = (aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default)
ATEN_ELEMENTWISE: tuple[object, ...] = (
    aten.add.Tensor, aten.add_.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub_.Tensor, aten.sub.Scalar,
    aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div_.Tensor, aten.div.Scalar)
ATEN_SHAPE_QUERIES: tuple[object, ...] = (aten.sym_size.int, aten.sym_numel.default)
CHANNELWISE_TARGETS = (*CHANNELWISE_FUNCTIONS, *REDUCTIONS, *ATEN_CHANNELWISE, *ATEN_REDUCTIONS)
ELEMENTWISE_TARGETS = (*ELEMENTWISE_FUNCTIONS, *ATEN_ELEMENTWISE)


@dataclass(frozen=True)
class Component:
    """Channel spaces that must share one order, and the ops around them (qualified names / descriptions).

    ``spaces`` are node names in graph order; ``joins`` the elementwise ops joining two spaces (residual adds);
    ``blockers`` why a permutation cannot be folded (empty: it can, and ``permutable`` is True).
    """

    index: int
    spaces: tuple[str, ...]
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    channelwise: tuple[str, ...]
    joins: tuple[str, ...]
    blockers: tuple[str, ...]

    @property
    def permutable(self) -> bool:
        return not self.blockers

    def why_fixed(self) -> str:
        """One sentence naming what keeps the natural order (and the joins that coupled it there)."""
        via = f" (joined by {', '.join(self.joins[:3])}{', ...' if len(self.joins) > 3 else ''})" if self.joins else ""
        more = f" and {len(self.blockers) - 1} more" if len(self.blockers) > 1 else ""
        return f"coupled to {self.blockers[0]}{more}{via}"


@dataclass(frozen=True)
class ChannelCoupling:
    """The coupling graph (nodes: channel spaces with a ``channels`` attribute; edges: an ``op`` attribute) and its
    components; ``index`` maps a space (node name) to its component."""

    graph: nx.Graph
    components: tuple[Component, ...]
    index: Mapping[str, int]

    def component(self, space: str) -> Component:
        return self.components[self.index[space]]


def _channels(node: object) -> int | None:
    """The channel count of a node's value when it is a 3-D or 4-D tensor (else None)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) and node.op != "output" else None
    if isinstance(val, torch.Tensor) and val.dim() in (3, 4):
        return int(val.shape[-3])
    return None


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"{name} at node {node.name!r}"
    if node.op == "call_method":
        return f".{node.target}() at node {node.name!r}"
    return f"{node.op} {node.name!r}"


class _Builder:
    """Walks the graph once, adding spaces, coupling edges and the ops around each space."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.graph = nx.Graph()
        self.modules = dict(gm.named_modules())
        self.sites = {s.node: s for s in find_sites(gm)}
        self.calls = Counter(str(n.target) for n in gm.graph.find_nodes(op="call_module"))
        for node in gm.graph.nodes:
            c = _channels(node)
            if c is not None:
                self.graph.add_node(node.name, channels=c, order=len(self.graph), producers=[], consumers=[],
                                    channelwise=[], joins=[], blockers=[])

    def role(self, space: torch.fx.Node, kind: str, what: str) -> None:
        if space.name in self.graph:
            self.graph.nodes[space.name][kind].append(what)

    def block(self, node: torch.fx.Node, why: str) -> None:
        """``node``'s own space and every space it reads keep their order (``why`` is the blocker's text)."""
        for space in (node, *node.all_input_nodes):
            self.role(space, "blockers", why)

    def join(self, a: torch.fx.Node, b: torch.fx.Node, op: torch.fx.Node) -> None:
        self.graph.add_edge(a.name, b.name, op=op.name)

    def visit(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            self.role(node, "blockers", f"model input {node.name!r}")
        elif node.op == "get_attr":
            self.role(node, "blockers", f"constant {node.target!r}")
        elif node.op == "output":
            for space in node.all_input_nodes:
                self.role(space, "blockers", "the model output")
        elif node.op == "call_module" and isinstance(self.modules.get(str(node.target)), nn.Conv2d):
            self.conv(node)
        elif node.op == "call_module" and (why := self.state_blocker(str(node.target))) is not None:
            self.block(node, f"module {node.target!r} ({why})")
        elif self.channelwise_tuple(node):
            pass  # its getitem nodes carry the channels (next branch)
        elif node.op == "call_function" and node.target is operator.getitem and self.channelwise_tuple(node.args[0]):
            self.join(node.args[0].args[0], node, node)
        elif self.channelwise(node):
            source = node.args[0]
            assert isinstance(source, torch.fx.Node)
            self.join(source, node, node)
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, nn.BatchNorm2d) or (isinstance(module, nn.PReLU) and module.num_parameters > 1):
                self.role(node, "channelwise", str(node.target))
        elif self.elementwise(node):
            joined = [arg for arg in node.all_input_nodes if _channels(arg) == _channels(node)]
            for arg in joined:
                self.join(arg, node, node)
            if len(joined) > 1:
                self.role(node, "joins", _describe(node))
        elif not self.shape_query(node):
            self.block(node, _describe(node))

    def conv(self, node: torch.fx.Node) -> None:
        name = str(node.target)
        conv = self.modules[name]
        site = self.sites.get(node.name)
        source = node.args[0] if node.args else node.kwargs.get("input")
        if site is None or site.blocker is not None or hook_counts(conv) or not isinstance(source, torch.fx.Node):
            why = site.blocker.text if site is not None and site.blocker is not None else "not a plain conv call"
            self.block(node, f"conv {name!r} ({why})")
        elif conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1:
            self.join(source, node, node)  # depthwise, one output per channel: channel-wise
            self.role(node, "channelwise", name)
        elif conv.groups == 1:
            self.role(source, "consumers", name)
            self.role(node, "producers", name)
        else:
            self.block(node, f"grouped conv {name!r} (groups={conv.groups})")

    def channelwise(self, node: torch.fx.Node) -> bool:
        """A channel-wise op on its first argument (no other channel-carrying input; same channel count out)."""
        if node.op == "call_module":
            module = self.modules.get(str(node.target))
            if type(module) not in CHANNELWISE_MODULES:
                return False
        elif not ((node.op == "call_function" and node.target in CHANNELWISE_TARGETS)
                  or (node.op == "call_method" and node.target in CHANNELWISE_METHODS)):
            return False
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or _channels(node) is None or _channels(source) != _channels(node):
            return False
        others = [a for a in node.all_input_nodes if a is not source and _channels(a) is not None]
        return not others and source.meta["val"].dim() == node.meta["val"].dim()

    @staticmethod
    def channelwise_tuple(node: object) -> bool:
        """A channel-wise ATen op returning a tuple (``max_pool2d_with_indices``) read only by ``getitem`` nodes, each
        with the input's channel count and dims (anything else reading it makes it an unknown op: a blocker)."""
        if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
                and node.target in ATEN_CHANNELWISE_TUPLES and node.args and isinstance(node.args[0], torch.fx.Node)):
            return False
        source = node.args[0]
        channels = _channels(source)
        return channels is not None and len(node.all_input_nodes) == 1 and all(
            user.op == "call_function" and user.target is operator.getitem and _channels(user) == channels
            and user.meta["val"].dim() == source.meta["val"].dim() for user in node.users)

    def state_blocker(self, name: str) -> str | None:
        """Why a module's per-channel state cannot follow a permutation: it is shared, hooked or parametrized."""
        module = self.modules[name]
        if not (any(True for _ in module.parameters()) or any(b is not None for b in module.buffers())):
            return None
        if self.calls[name] > 1:
            return f"called {self.calls[name]} times"
        if hook_counts(module):
            return "it has hooks"
        return "its parameters are parametrized" if parametrize.is_parametrized(module) else None

    def elementwise(self, node: torch.fx.Node) -> bool:
        """An elementwise op whose channel-carrying operands all have the result's channel count (others broadcast
        over channels: scalars, tensors of fewer than 3 dims or with one channel)."""
        if not ((node.op == "call_function" and node.target in ELEMENTWISE_TARGETS)
                or (node.op == "call_method" and node.target in ELEMENTWISE_METHODS)):
            return False
        out = _channels(node)
        if out is None:
            return False
        for arg in node.all_input_nodes:
            val = arg.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return False
            if val.dim() >= 3 and int(val.shape[-3]) not in (1, out):
                return False
        return True

    @staticmethod
    def shape_query(node: torch.fx.Node) -> bool:
        """``x.size()`` / ``x.dim()`` / ``x.shape``: reads no channel values, so it does not constrain the order."""
        if node.op == "call_method":
            return node.target in SHAPE_QUERIES
        if node.op == "call_function" and node.target in ATEN_SHAPE_QUERIES:
            return True
        return (node.op == "call_function" and node.target is getattr and len(node.args) > 1
                and node.args[1] in ("shape", "dtype", "device", "ndim"))


def channel_coupling(gm: torch.fx.GraphModule) -> ChannelCoupling:
    """Build the channel-coupling graph of ``gm`` (shape metadata must have been propagated; a node without it
    has no space, and an op reading such a node keeps the order of its other spaces)."""
    builder = _Builder(gm)
    for node in gm.graph.nodes:
        builder.visit(node)
    graph = builder.graph
    components: list[Component] = []
    index: dict[str, int] = {}
    ordered = sorted(nx.connected_components(graph), key=lambda c: min(graph.nodes[s]["order"] for s in c))
    for i, members in enumerate(ordered):
        spaces = sorted(members, key=lambda s: graph.nodes[s]["order"])
        attrs = [graph.nodes[s] for s in spaces]
        counts = sorted({a["channels"] for a in attrs})
        blockers = [b for a in attrs for b in a["blockers"]]
        if len(counts) > 1:
            blockers.append(f"spaces with different channel counts {counts}")
        components.append(Component(
            index=i, spaces=tuple(spaces), channels=counts[0],
            producers=_unique(p for a in attrs for p in a["producers"]),
            consumers=_unique(c for a in attrs for c in a["consumers"]),
            channelwise=_unique(c for a in attrs for c in a["channelwise"]),
            joins=_unique(j for a in attrs for j in a["joins"]), blockers=_unique(blockers)))
        index.update((s, i) for s in spaces)
    return ChannelCoupling(graph, tuple(components), index)


def _unique(items: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))  # type: ignore[call-overload]
