"""Channel shuffle (ShuffleNet): let a grouped conv's consumer see channels from every producer group.

A *shuffle site* is a conv B whose input comes from a grouped conv A (1 < A.groups < A.in_channels) through
channel-wise ops only: batch norm, activations, dropout, and depthwise convs with one output per channel (a
depthwise conv is channel-wise, so a shuffle before it equals a shuffle after it with its filters permuted). The pass
puts ``shuffle(x, A.groups)`` on B's input edge - with ``rule=shufflenet`` only where B is itself grouped (the
ShuffleNet rule: grouped 1x1 -> BN -> ReLU -> depthwise -> BN -> grouped 1x1 gets one shuffle, in front of the second
grouped conv), with ``rule=all`` in front of every such B. A trained model must not silently change, so B's weight is
compensated: B'(shuffle(x)) = B(x) needs W'[:, k] = W[:, perm[k]] (``perm`` from
``factorize.channel_shuffle_permutation``).

- B dense (groups=1), ``fold=true``: the shuffle and its compensation cancel exactly, so nothing is inserted (the
  shuffle is folded into B's input-channel order at zero run-time cost); the record says ``folded``, exact.
- B dense, ``fold=false``: the op is kept and B's input channels are reordered (exact), so a later ``grouped`` pass
  on B groups channels across A's groups.
- B grouped: the op is kept and B keeps the block diagonal of its reordered weight; the weight energy this loses is
  reported as the relative error (the function changes, and the report says by how much).
- B depthwise: skipped (``depthwise-consumer``): it is channel-wise, the next conv that mixes channels is the site.

Every record says ``details["shuffle"]``: ``op`` (the op is in the graph, as plain ``unflatten`` / ``transpose`` /
``flatten`` tensor methods - ``nn.ChannelShuffle`` fails the legacy ONNX exporter) or ``folded``. Consumers of one
tensor that all need the same shuffle share one op. A second run finds the shuffles it inserted and changes nothing.

>>> import torch
>>> from torch import nn
>>> from fxrewrite.graph.capture import trace
>>> m = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
>>> r = ChannelShuffle(rule="all", fold=False)(trace(m))
>>> [n.target for n in r.graph_module.graph.nodes if n.op == "call_method"]
['unflatten', 'transpose', 'flatten']
>>> x = torch.randn(1, 8, 4, 4)
>>> torch.testing.assert_close(r.graph_module(x), m(x))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxrewrite.graph.rewriter import PROVENANCE_KEY, finalize, insert_methods_before, reroute_input, set_conv_weight
from fxrewrite.graph.select import Rule, Selection, resolve
from fxrewrite.graph.sites import ConvSite, find_sites
from fxrewrite.maths import factorize
from fxrewrite.report.report import SiteRecord

from .conv_rewrite import wrap_site_error
from .interface import Pass, PassResult


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle of an (N, C, H, W) or (C, H, W) tensor: exactly the ops the pass inserts.

    >>> channel_shuffle(torch.arange(6.0).reshape(1, 6, 1, 1), 2).flatten().tolist()
    [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    """
    out = x
    for method, args in shuffle_steps(x.dim(), x.shape[-3], groups):
        out = getattr(out, method)(*args)
    return out


def shuffle_steps(ndim: int, channels: int, groups: int) -> list[tuple[str, tuple[Any, ...]]]:
    """The tensor-method chain of a channel shuffle on a tensor of ``ndim`` dims (channels at dim ``ndim - 3``)."""
    c = ndim - 3
    return [("unflatten", (c, (groups, channels // groups))), ("transpose", (c, c + 1)), ("flatten", (c, c + 1))]


CHANNELWISE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU,
                       nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d,
                       nn.Mish)
CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, torch.sigmoid,
                         torch.tanh, F.dropout)
CHANNELWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous")


def _channelwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.PReLU):
            return True
        if type(module) is nn.Conv2d:  # depthwise with one output per channel: channel-wise
            return module.groups == module.in_channels == module.out_channels and module.in_channels > 1
        return type(module) in CHANNELWISE_MODULES
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in CHANNELWISE_METHODS


def _is_inserted_shuffle(node: torch.fx.Node) -> bool:
    meta = node.meta.get(PROVENANCE_KEY)
    return isinstance(meta, dict) and meta.get("pass") == ChannelShuffle.name


@dataclass(frozen=True)
class Producer:
    """What feeds a conv's input: the conv that produced it, the depthwise convs passed on the way, or a shuffle."""

    node: torch.fx.Node | None
    through: tuple[str, ...] = ()
    shuffled: bool = False


def producer_conv(node: torch.fx.Node, gm: torch.fx.GraphModule,
                  modules: dict[str, nn.Module] | None = None) -> Producer:
    """The conv node feeding ``node``'s first input through channel-wise ops only (``Producer(None)`` if none)."""
    modules = dict(gm.named_modules()) if modules is None else modules
    current = node.args[0] if node.args else node.kwargs.get("input")
    through: list[str] = []
    while isinstance(current, torch.fx.Node):
        if _is_inserted_shuffle(current):
            return Producer(None, tuple(through), shuffled=True)
        module = modules.get(str(current.target)) if current.op == "call_module" else None
        is_conv = isinstance(module, nn.Conv2d)
        if is_conv and not _channelwise(current, modules):
            return Producer(current, tuple(through))
        if not _channelwise(current, modules) or not current.args:
            return Producer(None, tuple(through))
        if is_conv:
            through.append(str(current.target))
        current = current.args[0]
    return Producer(None, tuple(through))


@dataclass(frozen=True)
class Decision:
    """One shuffle site: the consumer, its producer, the shuffle groups and the action (op | folded | skip)."""

    site: ConvSite
    producer: Producer
    groups: int
    action: str  # "op", "folded" or "skip"
    code: str = ""
    text: str = ""


@dataclass(frozen=True)
class ChannelShuffle(Pass):
    """Insert ShuffleNet channel shuffles after grouped convs, compensating the consumer's weights."""

    name = "channel-shuffle"
    description = "insert a channel shuffle between a grouped conv and its consumer conv, compensating the weights"
    rule: str = "shufflenet"
    fold: bool = True

    def __post_init__(self) -> None:
        self._require(self.rule in ("shufflenet", "all"),
                      f"{self.name}: rule must be 'shufflenet' or 'all', got {self.rule!r}")
        self._require(isinstance(self.fold, bool), f"{self.name}: fold must be true or false, got {self.fold!r}")

    def _decisions(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]) -> list[Decision]:
        sites = find_sites(gm)
        selections = resolve(rules, sites) if rules else {s.name: Selection(s.name, True, None) for s in sites}
        nodes = {n.name: n for n in gm.graph.nodes}
        modules = dict(gm.named_modules())
        out = []
        for site in sites:
            if site.kind != "module":
                continue  # a functional conv's producer is not followed
            producer = producer_conv(nodes[site.node], gm, modules)
            if producer.shuffled:
                out.append(Decision(site, producer, 0, "skip", "already-shuffled",
                                    "a channel shuffle inserted by this pass is already in front of it"))
                continue
            prod = modules[str(producer.node.target)] if producer.node is not None else None
            if not isinstance(prod, nn.Conv2d) or not (1 < prod.groups < prod.in_channels):
                continue  # not fed by a grouped conv: not a shuffle site at all
            g = prod.groups
            s = site.spec
            skip = None
            if not selections[site.name].selected:
                skip = ("not-selected", "excluded by the selection rules")
            elif site.blocker is not None:
                skip = (site.blocker.code, site.blocker.text)
            elif s.is_depthwise:
                skip = ("depthwise-consumer", "a depthwise conv is channel-wise: the shuffle goes in front of the "
                        "next conv that mixes channels")
            elif s.in_channels != prod.out_channels or s.in_channels % g:
                skip = ("channels-mismatch", f"in_channels={s.in_channels} is not the {prod.out_channels} channels "
                        f"of producer {producer.node.target!r} split in {g} groups")
            elif s.groups == 1 and self.rule == "shufflenet":
                skip = ("dense-consumer", "rule=shufflenet shuffles only between two grouped convs; use rule=all")
            if skip is not None:
                out.append(Decision(site, producer, g, "skip", *skip))
            else:
                out.append(Decision(site, producer, g, "folded" if s.groups == 1 and self.fold else "op"))
        return out

    def _record(self, d: Decision, status: str, rel_error: float | None = None) -> SiteRecord:
        site = d.site
        common: dict[str, Any] = {
            "site": site.name, "pass_name": self.name, "options": self.options(), "params_before": site.params,
            "params_after": site.params, "macs_before": site.macs if site.output_shape else None,
            "macs_after": site.macs if site.output_shape else None}
        details: dict[str, Any] = {"producer": str(d.producer.node.target) if d.producer.node is not None else None,
                                   "through": list(d.producer.through), "shuffle_groups": d.groups}
        if d.action == "skip":
            return SiteRecord(status="skipped", code=d.code, reason=f"{site.name}: {d.text}", details=details,
                              **common)
        if d.action == "folded":
            return SiteRecord(status="skipped", code="folded", reason=f"{site.name}: shuffle(groups={d.groups}) "
                              "before a dense conv folds exactly into its input-channel order: no op inserted, zero "
                              "run-time cost", rel_error=0.0, exact=True, details=details | {"shuffle": "folded"},
                              **common)
        exact = rel_error == 0.0 if rel_error is not None else None
        return SiteRecord(status=status, rel_error=rel_error, exact=exact, details=details | {"shuffle": "op"},
                          **common)

    @staticmethod
    def _compensated(gm: torch.fx.GraphModule, site: ConvSite, g: int) -> factorize.BlockDiagonal:
        """B's weight for input shuffle(x, g): columns reordered by the shuffle, then B's own block diagonal."""
        conv = gm.get_submodule(site.name)
        dense = factorize.dense_weight(conv.weight.detach(), conv.groups)
        perm = factorize.channel_shuffle_permutation(conv.in_channels, g).to(dense.device)
        return factorize.block_diagonal(dense[:, perm], source_groups=1, groups=conv.groups)

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        return [self._record(d, "planned" if d.action == "op" else "skipped",
                             self._compensated(gm, d.site, d.groups).rel_error if d.action == "op" else None)
                for d in self._decisions(gm, rules)]

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        records = []
        nodes = {n.name: n for n in gm.graph.nodes}
        shared: dict[tuple[str, int], torch.fx.Node] = {}  # (input node, groups) -> shuffle already inserted
        modified = False
        for d in self._decisions(gm, rules):
            if d.action != "op":
                records.append(self._record(d, "skipped"))
                continue
            node = nodes[d.site.node]
            with wrap_site_error(self.name, d.site.name):
                input_node = node.args[0]
                assert isinstance(input_node, torch.fx.Node)
                block = self._compensated(gm, d.site, d.groups)
                set_conv_weight(gm, d.site.name, block.weight)
                key = (input_node.name, d.groups)
                if key in shared:
                    reroute_input(node, input_node, shared[key])
                else:
                    val = input_node.meta.get("val")
                    ndim = val.dim() if isinstance(val, torch.Tensor) else 4
                    steps = shuffle_steps(ndim, d.site.spec.in_channels, d.groups)
                    shared[key] = insert_methods_before(
                        gm, node, input_node, steps,
                        {"pass": self.name, "site": d.site.name, "options": self.options(), "op": "channel_shuffle",
                         "groups": d.groups})
            records.append(self._record(d, "rewritten", block.rel_error))
            modified = True
        if modified:
            finalize(gm)
        return PassResult(gm, modified, tuple(records))
