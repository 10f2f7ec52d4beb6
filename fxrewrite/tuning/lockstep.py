"""Resumable runs for the repair: both models run once over the calibration batches, each batch's run paused at the
node a repair step reads and resumed after the step changed its module (``Lockstep``), instead of running both models
from the inputs up to every step (which is quadratic in the steps: resnet18 with 13 refit sites and 19 BatchNorms
ran its stem about 130 times).

The values are the same: a step changes only the module called at its own node, which every paused run reaches
after the pause (the steps are in graph order), and a module called at several nodes rules the lockstep out
(``lockstep_ok``). The paused runs hold every batch's live values at once, so ``lockstep_bytes`` bounds that from
the shapes recorded on the rewritten model and the repair uses it only within its memory cap.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh()))
>>> _, relu, tanh, _ = gm.graph.nodes
>>> runs = Lockstep(gm, gm, [(torch.tensor([-1.0]),), (torch.tensor([2.0]),)], [(relu, relu), (tanh, tanh)])
>>> [(float(a), float(b)) for a, b in runs.pairs(relu, relu)]
[(0.0, 0.0), (2.0, 2.0)]
>>> [round(float(a), 4) for a, _ in runs.pairs(tanh, tanh)]
[0.0, 0.964]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxrewrite.errors import FxRewriteError
from fxrewrite.graph.recorder import node_values

__all__ = ["Lockstep", "lockstep_bytes", "lockstep_ok", "step_pairs"]


class _Run:
    """One batch's paused run of one model: the generator, the watched values it has passed (cloned: a later
    in-place op must not change them) and how many more times each watched node will be asked for."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: Sequence[Any], uses: Counter[torch.fx.Node]) -> None:
        self.values = node_values(gm, inputs, set(uses))
        self.stash: dict[torch.fx.Node, Any] = {}
        self.uses = Counter(uses)

    def take(self, node: torch.fx.Node) -> Any:
        while node not in self.stash:
            try:
                seen, value = next(self.values)
            except StopIteration:
                raise FxRewriteError(f"lockstep: the run ended before node {node.name!r}") from None
            if seen is node and self.uses[node] == 1:
                self.stash[seen] = value  # the run is paused here: nothing can change it before it is used
            else:
                self.stash[seen] = pytree.tree_map_only(torch.Tensor, torch.clone, value)
        value = self.stash[node]
        self.uses[node] -= 1
        if self.uses[node] <= 0:
            del self.stash[node]
        return value


class Lockstep:
    """Paused runs of ``model`` and ``original`` over ``inputs`` (a list of input tuples); ``requests`` are the
    ``(model node, original node)`` pairs that the steps will ask for, in order (``pairs``)."""

    def __init__(self, original: torch.fx.GraphModule, model: torch.fx.GraphModule, inputs: Sequence[Sequence[Any]],
                 requests: Iterable[tuple[torch.fx.Node, torch.fx.Node]]) -> None:
        requests = list(requests)
        uses_m, uses_o = Counter(m for m, _ in requests), Counter(o for _, o in requests)
        self.runs = [(_Run(model, x, uses_m), _Run(original, x, uses_o)) for x in inputs]

    def pairs(self, model_node: torch.fx.Node, original_node: torch.fx.Node) -> Iterator[tuple[Any, Any]]:
        """Per batch, the value of ``model_node`` in the model as it is now (every earlier step applied) and of
        ``original_node`` in the original."""
        for model_run, original_run in self.runs:
            yield model_run.take(model_node), original_run.take(original_node)


def step_pairs(original: torch.fx.GraphModule, model: torch.fx.GraphModule, batches: Callable[[], Iterable[Any]],
               model_node: torch.fx.Node, original_node: torch.fx.Node) -> Iterator[tuple[Any, Any]]:
    """What ``Lockstep.pairs`` gives, without paused runs: per batch, both models run from the inputs up to the two
    nodes (the repair's step-by-step route, for data it streams or when the runs would not fit)."""
    for inputs in batches():
        yield (next(node_values(model, inputs, [model_node], stop=model_node))[1],
               next(node_values(original, inputs, [original_node], stop=original_node))[1])


def lockstep_ok(model: torch.fx.GraphModule, targets: Iterable[str]) -> bool:
    """True when every module the steps change (``targets``) is called at exactly one node of ``model``."""
    calls = Counter(str(n.target) for n in model.graph.nodes if n.op == "call_module")
    return all(calls[t] == 1 for t in targets)


def lockstep_bytes(model: torch.fx.GraphModule, samples: int) -> int | None:
    """An upper bound of what the paused runs of both models hold for ``samples`` calibration samples: twice the
    rewritten model's peak of live values per sample (from ``node.meta["val"]``, freed after their last use as the
    runs free them) times the samples, plus every watched value kept for later; None without recorded shapes."""
    nodes = list(model.graph.nodes)
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    size: dict[torch.fx.Node, int] = {}
    live = peak = 0
    batch = None
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if "val" not in n.meta:
            return None
        tensors = [t for t in pytree.tree_leaves(n.meta["val"]) if isinstance(t, torch.Tensor)]
        if n.op == "placeholder" and batch is None and tensors and tensors[0].dim():
            batch = int(tensors[0].shape[0])
        size[n] = sum(t.numel() * t.element_size() for t in tensors)
        live += size[n]
        peak = max(peak, live)
        for a in n.all_input_nodes:
            if last.get(a) == i:
                live -= size[a]
    if not batch:
        return None
    return 2 * 2 * peak * -(-samples // batch)  # both models, and as much again for the watched values kept
