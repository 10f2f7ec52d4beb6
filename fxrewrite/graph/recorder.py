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
from fxrewrite.util.runtime import submodule


class ValueRecorder(torch.fx.Interpreter):
    """Runs a graph and hands selected node values to ``on_value(node, value)`` as they are produced."""

    def __init__(self, gm: torch.fx.GraphModule, watch: set[str],
                 on_value: Callable[[torch.fx.Node, Any], None]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._watch = watch
        self._on_value = on_value
        self.current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        # Interpreter.run_node without its per-node debug log and traceback-meta context (what tracing through an
        # interpreter needs, not a plain run): a tenth of a rewritten ResNet-152's run at 64x64
        self.current = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        out = getattr(self, n.op)(n.target, args, kwargs)
        if n.name in self._watch:
            self._on_value(n, out)
        return out

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return submodule(self.module, str(target))(*args, **kwargs)  # fetch_attr's getattr walk, without its cost


class SubgraphRunner:
    """A connected run of nodes of a graph (a rewritten site, or one original conv) as a callable of one input.

    The nodes are copied into a small GraphModule that shares ``gm``'s submodules and parameters; inputs from
    outside the run other than ``input_node`` must be ``get_attr`` constants. ``compiled=False`` runs the nodes
    as they are instead (``run_nodes``): the same values, without generating and compiling code for each runner
    (what a verifier with thousands of sites spends its time on); timings want the compiled one.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> x_node, relu, tanh, _ = gm.graph.nodes
    >>> SubgraphRunner(gm, [tanh], relu)(torch.zeros(2)).tolist()
    [0.0, 0.0]
    """

    def __init__(self, gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], input_node: torch.fx.Node, *,
                 compiled: bool = True) -> None:
        if not compiled:
            for n in nodes:
                for a in n.all_input_nodes:
                    if a is not input_node and a not in nodes and a.op != "get_attr":
                        raise FxRewriteError(f"node {n.name} reads {a.name} ({a.op}) from outside its site; the "
                                             "site cannot be run on its own")
            self.module: torch.fx.GraphModule | None = None
            self._run = (gm, list(nodes), input_node)
            return
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
        if self.module is not None:
            return self.module(x)
        gm, nodes, input_node = self._run
        return run_nodes(gm, nodes, {input_node: x})[nodes[-1]]


def run_nodes(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node],
              env: dict[torch.fx.Node, Any]) -> dict[torch.fx.Node, Any]:
    """Run ``nodes`` (in graph order) of ``gm`` on the values in ``env`` (every node they read that is not among
    them, except ``get_attr`` constants, which are fetched), as ``torch.fx.Interpreter`` would; returns ``env`` with
    their values added. No per-call setup over the whole graph: the cost is that of the nodes.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
    >>> x_node, relu, tanh, _ = gm.graph.nodes
    >>> run_nodes(gm, [relu, tanh], {x_node: torch.tensor([-1.0, 0.5])})[tanh].tolist() == torch.tanh(
    ...     torch.tensor([0.0, 0.5])).tolist()
    True
    """
    def value(n: torch.fx.Node) -> Any:
        if n not in env and n.op == "get_attr":
            env[n] = _fetch(gm, str(n.target))
        return env[n]

    for n in nodes:
        args = torch.fx.node.map_arg(n.args, value)
        kwargs = torch.fx.node.map_arg(n.kwargs, value)
        if n.op == "call_module":
            env[n] = submodule(gm, str(n.target))(*args, **kwargs)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)  # type: ignore[operator]
        elif n.op == "call_method":
            env[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
        elif n.op == "get_attr":
            env[n] = _fetch(gm, str(n.target))
        else:
            raise FxRewriteError(f"node {n.name} ({n.op}) cannot be run on its own")
    return env


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
