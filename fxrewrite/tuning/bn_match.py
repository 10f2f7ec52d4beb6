"""BatchNorm statistics after a refit: ``match`` folds into a BatchNorm's running statistics the per-channel map
that gives its input in the rewritten model the mean and variance of its input in the original (held-out check per
channel), ``reestimate`` recomputes them from scratch on the calibration data. See ``fxrewrite.tuning.repair``.

>>> import copy
>>> from fxrewrite.tuning.progress import Progress
>>> _ = torch.manual_seed(0)
>>> original = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval())
>>> model = copy.deepcopy(original)
>>> with torch.no_grad():
...     _ = model.get_submodule("0").weight.mul_(2)  # the rewritten conv's output: 2 W x + b instead of W x + b
>>> node, ref = (next(n for n in gm.graph.nodes if n.target == "1") for gm in (model, original))
>>> data = [(torch.randn(8, 2, 4, 4),) for _ in range(4)]
>>> with torch.no_grad():
...     changed = match(original, model, node, ref, lambda: data, Progress(False, None, "match"))
...     x = torch.randn(4, 2, 4, 4)
...     changed, torch.allclose(model(x), original(x), atol=1e-5)
(3, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fxrewrite.graph.recorder import node_values
from fxrewrite.tuning.calibration_data import halves
from fxrewrite.tuning.lockstep import step_pairs
from fxrewrite.tuning.progress import Progress
from fxrewrite.util.distributed import all_reduce, is_distributed

__all__ = ["batchnorm_at", "match", "reestimate"]


def batchnorm_at(model: torch.fx.GraphModule, node: torch.fx.Node) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm with running statistics that ``node`` calls (None if it calls something else)."""
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    bn = model.get_submodule(str(node.target))
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None and bn.running_var is not None:
        return bn
    return None


def reestimate(model: torch.fx.GraphModule, node: torch.fx.Node, batches: Callable[[], Iterable[Any]],
               progress: Progress) -> None:
    """Recompute the running statistics of the BatchNorm at ``node`` from scratch: the cumulative average over
    batches of its input's batch mean and unbiased variance (momentum=None, that layer alone in train mode, the
    model run up to it); momentum and train flag are restored. Across processes the averages are combined weighted
    by batch counts."""
    bn = batchnorm_at(model, node)
    assert bn is not None
    momentum, training = bn.momentum, bn.training
    try:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
        for inputs in batches():
            next(node_values(model, inputs, [node], stop=node))
            progress.update(f"re-estimate {node.target}")
    finally:
        bn.momentum = momentum
        bn.train(training)
    if is_distributed():
        n = bn.num_batches_tracked.to(torch.float64)
        mean, var, total = bn.running_mean.to(torch.float64) * n, bn.running_var.to(torch.float64) * n, n.clone()
        all_reduce(mean, var, total)
        bn.running_mean.copy_(mean / total)
        bn.running_var.copy_(var / total)
        bn.num_batches_tracked.copy_(total.to(bn.num_batches_tracked.dtype))


_MOMENTS = 6  # per-channel sums: r, o, r^2, o^2, r o, count


def _channel_sums(xr: torch.Tensor, xo: torch.Tensor, sums: torch.Tensor) -> None:
    """Add per-channel sum r, sum o, sum r^2, sum o^2, sum r o and count of (N, C, ...) tensors to ``sums`` (6, C),
    float64."""
    r = xr.detach().to(torch.float64).transpose(0, 1).reshape(xr.shape[1], -1)
    o = xo.detach().to(torch.float64).transpose(0, 1).reshape(xo.shape[1], -1)
    sums[0] += r.sum(dim=1)
    sums[1] += o.sum(dim=1)
    sums[2] += r.square().sum(dim=1)
    sums[3] += o.square().sum(dim=1)
    sums[4] += (r * o).sum(dim=1)
    sums[5] += r.shape[1]


def _moment_map(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the a > 0, b with a r + b having the mean and variance of o (a = 1 where either is constant)."""
    n = sums[5].clamp_min(1)
    m_r, m_o = sums[0] / n, sums[1] / n
    var_r = (sums[2] / n - m_r.square()).clamp_min(0)
    var_o = (sums[3] / n - m_o.square()).clamp_min(0)
    ok = (var_r > 1e-12 * (sums[2] / n)) & (var_o > 1e-12 * (sums[3] / n))
    a = torch.where(ok, (var_o / torch.where(ok, var_r, torch.ones_like(var_r))).sqrt(), torch.ones_like(var_r))
    return a, m_o - a * m_r


def _map_error(sums: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per channel, sum (a r + b - o)^2 from the sums of ``_channel_sums``."""
    s_r, s_o, s_rr, s_oo, s_ro, n = sums
    return a.square() * s_rr + 2 * a * b * s_r + b.square() * n - 2 * a * s_ro - 2 * b * s_o + s_oo


def match(original: torch.fx.GraphModule, model: torch.fx.GraphModule, node: torch.fx.Node,
          ref: torch.fx.Node, batches: Callable[[], Iterable[Any]], progress: Progress,
          pairs: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> int:
    """Fold into the running statistics of the BatchNorm at ``node`` the per-channel map a r + b (a > 0) that gives
    its input r in the rewritten model the mean and variance of its input o in the original (node ``ref``) on the
    data: mean' = (mean - b) / a, var' = (var + eps) / a^2 - eps, so BN'(r) = BN(a r + b) and the BatchNorm's output
    has the original's per-channel mean and variance. Identical inputs give a = 1, b = 0 (statistics unchanged).

    Only the channels that pass the held-out check (the map fit on the fit half brings r closer to o on the check
    half) and whose folded variance stays positive are changed; returns their number. ``pairs`` (optional) gives
    per batch the BatchNorm's input in the rewritten and in the original model, instead of running both up to it."""
    bn = batchnorm_at(model, node)
    assert bn is not None and isinstance(ref.args[0], torch.fx.Node)
    x_node, o_node = node.args[0], ref.args[0]
    assert isinstance(x_node, torch.fx.Node)
    fit, check = (torch.zeros(_MOMENTS, bn.num_features, dtype=torch.float64, device=bn.running_mean.device)
                  for _ in range(2))
    if pairs is None:
        pairs = step_pairs(original, model, batches, x_node, o_node)
    for xr, xo in pairs:
        (r_fit, r_check), (o_fit, o_check) = halves(xr.to(fit.device)), halves(xo.to(fit.device))
        _channel_sums(r_fit, o_fit, fit)
        _channel_sums(r_check, o_check, check)
        progress.update(f"match {node.target}")
    all_reduce(fit, check)
    a, b = _moment_map(fit)
    mean, var = bn.running_mean.to(torch.float64), bn.running_var.to(torch.float64)
    new_var = (var + bn.eps) / a.square() - bn.eps
    identity = _map_error(check, torch.ones_like(a), torch.zeros_like(b))
    keep = (check[5] > 0) & (_map_error(check, a, b) < identity) & (new_var > 0)
    bn.running_mean.copy_(torch.where(keep, (mean - b) / a, mean))
    bn.running_var.copy_(torch.where(keep, new_var, var))
    return int(keep.sum())
