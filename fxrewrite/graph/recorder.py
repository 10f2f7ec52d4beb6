"""Running a graph and seeing its values: every watched node's value as it is produced (one run, values freed
after their last use), and a connected run of nodes as a callable of its own.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
>>> seen = {}
>>> _ = ValueRecorder(gm, {"_0"}, lambda n, v: seen.setdefault(n.name, v.tolist())).run(torch.tensor([-1.0]))
>>> seen
{'_0': [0.0]}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from fxrewrite.errors import FxRewriteError


class ValueRecorder(torch.fx.Interpreter):
    """Runs a graph and hands selected node values to ``on_value(node, value)`` as they are produced."""

    def __init__(self, gm: torch.fx.GraphModule, watch: set[str],
                 on_value: Callable[[torch.fx.Node, Any], None]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._watch = watch
        self._on_value = on_value
        self.current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        out = super().run_node(n)
        if n.name in self._watch:
            self._on_value(n, out)
        return out


class SubgraphRunner:
    """A connected run of nodes of a graph (a rewritten site, or one original conv) as a callable of one input.

    The nodes are copied into a small GraphModule that shares ``gm``'s submodules and parameters; inputs from
    outside the run other than ``input_node`` must be ``get_attr`` constants.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> x_node, relu, tanh, _ = gm.graph.nodes
    >>> SubgraphRunner(gm, [tanh], relu)(torch.zeros(2)).tolist()
    [0.0, 0.0]
    """

    def __init__(self, gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], input_node: torch.fx.Node) -> None:
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {input_node: graph.placeholder("x")}
        for n in nodes:
            for a in n.all_input_nodes:
                if a in env:
                    continue
                if a.op != "get_attr":
                    raise FxRewriteError(f"node {n.name} reads {a.name} ({a.op}) from outside its site; the site "
                                         "cannot be run on its own")
                env[a] = graph.node_copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[nodes[-1]])
        self.module = torch.fx.GraphModule(gm, graph, "Site")

    def __call__(self, x: Any) -> Any:
        return self.module(x)


def node_values(gm: torch.fx.GraphModule, inputs: Sequence[Any], watch: Iterable[torch.fx.Node],
                stop: torch.fx.Node | None = None) -> Iterator[tuple[torch.fx.Node, Any]]:
    """Run ``gm`` node by node, yielding ``(node, value)`` for watched nodes as they are produced; stop after ``stop``.

    Values are freed after their last use (as ``torch.fx.Interpreter`` does), so only live values are held.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> _, relu, tanh, _ = gm.graph.nodes
    >>> [(n.name, v.tolist()) for n, v in node_values(gm, (torch.tensor([-1.0]),), [relu], stop=relu)]
    [('_0', [0.0])]
    """
    watched = set(watch)
    interp = torch.fx.Interpreter(gm, garbage_collect_values=True)
    interp.env = {}
    interp.args_iter = iter(gm.graph.process_inputs(*inputs))
    for node in gm.graph.nodes:
        value = interp.run_node(node)
        interp.env[node] = value
        if node in watched:
            yield node, value
        if node is stop or node.op == "output":
            return
        for dead in interp.user_to_last_uses.get(node, []):
            del interp.env[dead]
