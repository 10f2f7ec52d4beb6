"""Channel shuffle (ShuffleNet): let a grouped conv's consumer see channels from every producer group.

For each conv B whose input comes from a grouped conv A (1 < A.groups < A.in_channels), possibly through
channel-wise ops (batch norm, activations, dropout), the pass inserts ``channel_shuffle(x, A.groups)`` on B's input
edge - with ``rule=shufflenet`` only where B is itself grouped (the ShuffleNet rule), with ``rule=all`` before every
such B. A trained model must not silently change, so B's weight is compensated: B'(shuffle(x)) = B(x) needs
W'[:, k] = W[:, perm[k]].

- B dense (groups=1), ``fold=true``: the shuffle and its compensation cancel exactly; nothing is inserted (the
  shuffle is folded at zero run-time cost) and the site is reported as ``folded``.
- B dense, ``fold=false``: the op is kept and B's input channels are reordered (exact), so a later
  ``grouped`` pass on B groups channels across A's groups.
- B grouped: the op is kept and B keeps the block diagonal of its reordered weight; the weight energy this loses is
  reported as the relative error (the function changes, and the report says by how much).

The shuffle is plain view/transpose/reshape (``nn.ChannelShuffle`` fails the legacy ONNX exporter).

>>> import torch
>>> from torch import nn
>>> from fxrewrite.capture import trace
>>> m = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
>>> r = ChannelShuffle(rule="all", fold=False)(trace(m))
>>> "channel_shuffle" in r.graph_module.code
True
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxrewrite import factorize
from fxrewrite.report import SiteRecord
from fxrewrite.rewriter import finalize, insert_op_before, set_conv_weight
from fxrewrite.select import Rule, Selection, resolve
from fxrewrite.sites import ConvSite, find_sites

from .base import Pass, PassResult


@torch.fx.wrap
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle of an (N, C, H, W) or (C, H, W) tensor with plain view/transpose/reshape."""
    *lead, c, h, w = x.shape
    return x.reshape(*lead, groups, c // groups, h, w).transpose(-4, -3).reshape(*lead, c, h, w)


CHANNELWISE_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU,
                       nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Mish)
CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, torch.sigmoid,
                         torch.tanh, F.dropout, operator.getitem)
CHANNELWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous")


def _channelwise(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            return True
        return type(module) in CHANNELWISE_MODULES
    if node.op == "call_function":
        return node.target in CHANNELWISE_FUNCTIONS and node.target is not operator.getitem
    return node.op == "call_method" and node.target in CHANNELWISE_METHODS


def producer_conv(node: torch.fx.Node, gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    """The conv node feeding ``node``'s first input through channel-wise ops only (None if there is none)."""
    current = node.args[0] if node.args else None
    while isinstance(current, torch.fx.Node):
        if current.op == "call_module" and isinstance(gm.get_submodule(str(current.target)), nn.Conv2d):
            return current
        if not _channelwise(current, gm) or not current.args:
            return None
        current = current.args[0]
    return None


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

    def _decisions(self, gm: torch.fx.GraphModule, rules: Sequence[Rule]
                   ) -> list[tuple[ConvSite, torch.fx.Node | None, int, str]]:
        """(consumer site, producer node, shuffle groups, action) with action op|folded|skip:<code>:<text>."""
        sites = find_sites(gm)
        selections = resolve(rules, sites) if rules else {s.name: Selection(s.name, True, None) for s in sites}
        nodes = {n.name: n for n in gm.graph.nodes}
        out = []
        for site in sites:
            node = nodes[site.node]
            producer = producer_conv(node, gm) if site.kind == "module" else None
            prod = gm.get_submodule(str(producer.target)) if producer is not None else None
            if prod is None or not (1 < prod.groups < prod.in_channels):
                continue  # not fed by a grouped conv: not a shuffle site at all
            g = prod.groups
            if not selections[site.name].selected:
                action = "skip:not-selected:excluded by the selection rules"
            elif site.blocker is not None:
                action = f"skip:{site.blocker.code}:{site.blocker.text}"
            elif site.spec.is_depthwise:
                action = "skip:depthwise-consumer:a depthwise consumer cannot absorb a channel permutation"
            elif site.spec.groups == 1 and self.rule == "shufflenet":
                action = "skip:dense-consumer:rule=shufflenet shuffles only between two grouped convs"
            elif site.spec.groups == 1 and self.fold:
                action = "folded"
            else:
                action = "op"
            out.append((site, producer, g, action))
        return out

    def _record(self, site: ConvSite, producer: torch.fx.Node, g: int, action: str, status: str,
                rel_error: float | None = None) -> SiteRecord:
        common = {"site": site.name, "pass_name": self.name, "options": self.options(),
                  "params_before": site.params, "params_after": site.params, "macs_before": site.macs,
                  "macs_after": site.macs}
        details = {"producer": str(producer.target), "shuffle_groups": g}
        if action.startswith("skip:"):
            _, code, text = action.split(":", 2)
            return SiteRecord(status="skipped", code=code, reason=text, details=details, **common)
        if action == "folded":
            return SiteRecord(status="skipped", code="folded", reason=f"shuffle(groups={g}) before a dense conv "
                              "folds exactly into its input-channel order: no op inserted, zero run-time cost",
                              rel_error=0.0, exact=True, details=details | {"shuffle": "folded"}, **common)
        exact = rel_error == 0.0 if rel_error is not None else None
        return SiteRecord(status=status, rel_error=rel_error, exact=exact, details=details | {"shuffle": "op"},
                          **common)

    def _compensated(self, gm: torch.fx.GraphModule, site: ConvSite, g: int) -> factorize.BlockDiagonal:
        conv = gm.get_submodule(site.name)
        dense = factorize.dense_weight(conv.weight.detach(), conv.groups)
        perm = factorize.channel_shuffle_permutation(conv.in_channels, g).to(dense.device)
        return factorize.block_diagonal(dense[:, perm], source_groups=1, groups=conv.groups)

    def plan(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> list[SiteRecord]:
        return [self._record(site, prod, g, action, "planned",
                             self._compensated(gm, site, g).rel_error if action == "op" else None)
                for site, prod, g, action in self._decisions(gm, rules)]

    def run(self, gm: torch.fx.GraphModule, rules: Sequence[Rule] = ()) -> PassResult:
        records = []
        nodes = {n.name: n for n in gm.graph.nodes}
        modified = False
        for site, producer, g, action in self._decisions(gm, rules):
            if action != "op":
                records.append(self._record(site, producer, g, action, "skipped"))
                continue
            node = nodes[site.node]
            input_node = node.args[0]
            if input_node.op == "call_function" and input_node.target is channel_shuffle:
                records.append(self._record(site, producer, g, "skip:already-shuffled:a shuffle is already there",
                                            "skipped"))
                continue
            block = self._compensated(gm, site, g)
            set_conv_weight(gm, site.name, block.weight)
            insert_op_before(gm, node, input_node, channel_shuffle, (g,),
                             {"pass": self.name, "site": site.name, "options": self.options()})
            records.append(self._record(site, producer, g, action, "rewritten", block.rel_error))
            modified = True
        if modified:
            finalize(gm)
        return PassResult(gm, modified, tuple(records))
