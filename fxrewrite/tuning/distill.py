"""Distillation fine-tune: train a copy of the rewritten model to reproduce the original model's outputs.

The loss per step is the relative squared error of the outputs, ||s - t||^2 / ||t||^2 summed over the output tensors
(t from the original, the teacher, in eval mode and without gradients; s from the rewritten model, the student), plus
``site_weight`` times the mean of the same quantity over the rewritten sites' outputs. Adam with a cosine learning
rate schedule (linear warm-up over the first tenth of the steps: Adam's first steps would otherwise jolt an already
repaired model); the data (unlabelled inputs: a list of input tuples or a DataLoader) is cycled as often as
``steps`` needs. The loss on the first data item is measured before and after training; if training raised it (on
the digits model, lr 1e-3 did so to an already repaired CP bottleneck: 0.00085 -> 0.0018), the input weights are
returned instead and the result says ``reverted`` (``revert_if_worse=False`` keeps the trained ones). The student is
trained in eval mode by default (BatchNorm statistics frozen, dropout off: the model is
trained as it will be run); ``train_mode=True`` trains it in train mode instead. Neither input module is changed.

>>> import torch, fxrewrite
>>> from fxrewrite.tuning.distill import distill
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
>>> rewritten = fxrewrite.rewrite(model, (torch.randn(1, 3, 10, 10),), passes="grouped{groups=2}").module
>>> result = distill(model, rewritten, [(torch.randn(4, 3, 10, 10),)], steps=20, lr=1e-2, progress=False)
>>> len(result.losses), result.losses[-1] < result.losses[0]
(20, True)
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import LeafSpec, as_graph_module
from fxrewrite.graph.recorder import node_values
from fxrewrite.graph.site_nodes import original_nodes, site_groups
from fxrewrite.tuning.calibration_data import output_leaves
from fxrewrite.util.distributed import all_reduce, is_distributed
from fxrewrite.util.inputs import InputFn, calibration_inputs, check_reiterable, to_device
from fxrewrite.util.runtime import device_of, eval_mode


@dataclass(frozen=True)
class DistillResult:
    """The fine-tuned module (a new GraphModule) and the loss of every step (relative squared error, see above)."""

    module: torch.fx.GraphModule
    losses: tuple[float, ...]
    steps: int
    lr: float
    device: str
    sites: tuple[str, ...] = ()
    seconds: float = 0.0
    probe_before: float = math.nan  # the loss on the first data item, eval mode, before training
    probe_after: float = math.nan  # the same after training (of the trained weights, even when reverted)
    reverted: bool = False  # training raised the probe loss, so ``module`` holds the input weights

    @property
    def initial_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps (less noisy than the last step alone)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail) if tail else math.nan

    def __str__(self) -> str:
        text = (f"distill: {self.steps} step(s) on {self.device}, lr {self.lr:g}, loss {self.initial_loss:.4g} -> "
                f"{self.final_loss:.4g} (relative squared output error), probe {self.probe_before:.4g} -> "
                f"{self.probe_after:.4g}, {self.seconds:.2f} s")
        if self.reverted:
            text += ("\ndistill: training raised the loss on the probe (the first data item), so the input weights "
                     "were kept; try a smaller lr")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "steps": self.steps, "lr": self.lr, "device": self.device,
                "sites": list(self.sites), "seconds": self.seconds, "probe_before": self.probe_before,
                "probe_after": self.probe_after, "reverted": self.reverted}


def _relative_sq(student: Any, teacher: Any) -> torch.Tensor:
    """sum over output tensors of ||s - t||^2 / ||t||^2. Under torch.distributed each process holds a shard of the
    batch: the denominators are summed over the processes first, so the processes' results add up to the relative
    error of the whole batch (and so do their gradients)."""
    total: torch.Tensor | None = None
    s_leaves, t_leaves = output_leaves(student), output_leaves(teacher)
    if len(s_leaves) != len(t_leaves):
        raise ConfigError(f"distill: the rewritten model returns {len(s_leaves)} floating tensor(s), the original "
                          f"{len(t_leaves)}")
    for s, t in zip(s_leaves, t_leaves, strict=True):
        energy = t.detach().square().sum()
        all_reduce(energy)
        term = (s - t).square().sum() / energy.clamp_min(torch.finfo(t.dtype).tiny)
        total = term if total is None else total + term
    if total is None:
        raise ConfigError("distill: the model returns no floating-point tensor to match")
    return total


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for item in data:
            empty = False
            yield item
        if empty:
            raise ConfigError("distill: the data is empty")


def _progress_bar(enabled: bool, steps: int) -> Any:
    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic
        return None
    return tqdm(total=steps, desc="distill", file=sys.stderr, leave=False)


def distill(original: nn.Module, rewritten: torch.fx.GraphModule, data: Iterable[Any], *, steps: int = 200,
            lr: float = 1e-3, device: str | torch.device | None = None, site_weight: float = 0.0,
            progress: bool = True, input_fn: InputFn | None = None, weight_decay: float = 0.0,
            train_mode: bool = False, concrete_args: Mapping[str, Any] | None = None,
            leaf_modules: Iterable[LeafSpec] = (), autowrap_functions: Iterable[Callable[..., Any]] = (),
            revert_if_worse: bool = True) -> DistillResult:
    """Fine-tune a copy of ``rewritten`` for ``steps`` Adam steps so its outputs (and, with ``site_weight > 0``, its
    rewritten sites' outputs) match ``original``'s on ``data``; returns the copy and the loss history.

    The loss on the first data item (eval mode, no gradient) is taken before and after training; when training
    raised it (an lr too large for an already repaired model does), ``revert_if_worse`` keeps the input weights and
    the result says so (``reverted``).

    ``device`` (default: where ``rewritten`` is) is where training runs; the inputs are moved there. A progress bar
    goes to stderr when it is a terminal and ``progress`` is True.

    Under ``torchrun`` (an initialised default process group), each process passes its own shard of the data (the
    same number of items, the same ``steps``): the loss is that of the whole batch (denominators and gradients are
    summed over the processes, as DistributedDataParallel would), every process takes the same steps and agrees on
    the revert, and each returns the same weights. BatchNorm in ``train_mode`` uses each shard's own statistics.
    """
    start = time.perf_counter()
    if not isinstance(rewritten, torch.fx.GraphModule):
        raise ConfigError(f"distill needs the rewritten GraphModule (RewriteResult.module), got "
                          f"{type(rewritten).__name__}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"distill: steps must be a positive integer, got {steps!r}")
    if not (lr > 0 and site_weight >= 0):
        raise ConfigError(f"distill: lr must be > 0 and site_weight >= 0, got lr={lr!r}, site_weight={site_weight!r}")
    check_reiterable(data, "distillation data")
    target = torch.device(device) if device is not None else (device_of(rewritten) or torch.device("cpu"))
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    student = copy.deepcopy(rewritten).to(target)
    teacher: nn.Module = original
    if device_of(original) not in (None, target):
        teacher = copy.deepcopy(original).to(target)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("distill: the rewritten model has no trainable parameters (all requires_grad=False)")

    site_names: tuple[str, ...] = ()
    reference: torch.fx.GraphModule | None = None
    watch: dict[torch.fx.Node, str] = {}
    hooks = []
    captured: dict[str, torch.Tensor] = {}
    if site_weight > 0:
        reference = as_graph_module(teacher, concrete_args=concrete_args, leaf_modules=leaf_modules,
                                    autowrap_functions=autowrap_functions)
        originals = original_nodes(reference)
        names = []
        for name, nodes in site_groups(student).items():
            last = nodes[-1]
            if name in originals and last.op == "call_module":
                module = student.get_submodule(str(last.target))
                hooks.append(module.register_forward_hook(_capture_hook(captured, name)))
                watch[originals[name]] = name
                names.append(name)
        if not names:
            raise ConfigError("distill: site_weight > 0 but no rewritten site ends in a module call whose output can "
                              "be matched; use site_weight=0")
        site_names = tuple(names)

    def loss_on(inputs: tuple[Any, ...]) -> torch.Tensor:
        with torch.no_grad():
            if reference is None:
                t_out, t_sites = teacher(*inputs), {}
            else:
                t_out, t_sites = _teacher_values(reference, inputs, watch)
        captured.clear()
        loss = _relative_sq(student(*inputs), t_out)
        if site_weight > 0:
            loss = loss + site_weight * torch.stack([_relative_sq(captured[n], t_sites[n]) for n in site_names]).mean()
        return loss

    first = next(iter(data), None)
    if first is None:
        raise ConfigError("distill: the data is empty")
    probe_inputs = to_device(calibration_inputs(first, input_fn), target)

    def global_value(loss: torch.Tensor) -> float:
        """The loss of the whole batch: the sum of the processes' parts (itself without torch.distributed)."""
        value = loss.detach().clone()
        all_reduce(value)
        return float(value)

    def probe() -> float:  # the same on every process, so all agree on the revert
        with torch.no_grad(), eval_mode(teacher, student):
            return global_value(loss_on(probe_inputs))

    start_state = {k: v.detach().clone() for k, v in student.state_dict().items()} if revert_if_worse else {}
    probe_before = probe()
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: _lr_factor(i, steps, warmup))
    losses: list[float] = []
    bar = _progress_bar(progress, steps)
    items = _cycle(data)
    try:
        with eval_mode(teacher):
            student.train(train_mode)
            for _ in range(steps):
                loss = loss_on(to_device(calibration_inputs(next(items), input_fn), target))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if is_distributed():  # each process holds its part of the whole batch's gradient: sum them
                    for param in params:
                        if param.grad is None:
                            param.grad = torch.zeros_like(param)
                        all_reduce(param.grad)
                optimizer.step()
                schedule.step()
                losses.append(global_value(loss))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        probe_after = probe()
    finally:
        for h in hooks:
            h.remove()
        if bar is not None:
            bar.close()
    reverted = revert_if_worse and probe_after > probe_before
    if reverted:
        student.load_state_dict(start_state)
    student.train(rewritten.training)
    student.zero_grad(set_to_none=True)
    return DistillResult(student, tuple(losses), steps, float(lr), str(target), site_names,
                         time.perf_counter() - start, probe_before, probe_after, reverted)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``.

    >>> [round(_lr_factor(i, 10, 2), 3) for i in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def _capture_hook(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        store[name] = output
    return hook


def _teacher_values(reference: torch.fx.GraphModule, inputs: Sequence[Any], watch: Mapping[torch.fx.Node, str]
                    ) -> tuple[Any, dict[str, torch.Tensor]]:
    out_node = next(n for n in reversed(reference.graph.nodes) if n.op == "output")
    values: dict[str, torch.Tensor] = {}
    output: Any = None
    for node, value in node_values(reference, inputs, [*watch, out_node]):
        if node is out_node:
            output = value
        else:
            values[watch[node]] = value
    return output, values
