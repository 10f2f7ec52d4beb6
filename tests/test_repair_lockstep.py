"""The repair's lockstep runs (fxrewrite.tuning.lockstep): with calibration batches in a list, both models run once
over the data between the two measurements instead of once per step (a refit site or a BatchNorm), and the repaired
model is the one the step by step repair gives, bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from models import SharedConv
from torch import nn

import fxrewrite
from fxrewrite.tuning.lockstep import lockstep_bytes, lockstep_ok
from fxrewrite.tuning.repair import repair


class _Net(nn.Module):
    """BatchNorms after every conv, a residual add and in-place ReLUs (a value the runs pass may change later)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                               nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.a(x) + x)
        return self.head(self.down(x).mean(dim=(2, 3)))


class _CountedList(list):  # type: ignore[type-arg]
    """A list that counts the passes over it."""

    passes = 0

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        return super().__iter__()


class _Streamed:
    """The same batches as a re-iterable that is not a list (streamed: the repair runs step by step)."""

    def __init__(self, batches: list[tuple[torch.Tensor]]) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        self.passes += 1
        return iter(self.batches)


def test_lockstep_reads_the_data_three_times_and_equals_the_step_by_step_repair() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # trained-looking statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(16, 3, 12, 12)
    batches = [(images[:8],), (images[8:],)]
    rewritten = fxrewrite.rewrite(model, (images[:1],), passes="depthwise-separable{rank=2}", verify=False).module
    assert lockstep_bytes(rewritten, 8) is not None
    listed, streamed = _CountedList(batches), _Streamed(batches)
    a = repair(model, rewritten, listed, progress=False)
    b = repair(model, rewritten, streamed, progress=False)
    steps = sum(s.status != "skipped" for s in b.sites) + len(b.bn_layers)
    # one iter() checks that the data is re-iterable; then: measure, the lockstep runs, measure
    assert listed.passes == 1 + 3
    assert streamed.passes == 1 + 2 + steps and steps >= 8  # measure twice, once per refit site and per BatchNorm
    for (k, p), q in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    assert [(s.status, s.error_after, s.check_after) for s in a.sites] == \
        [(s.status, s.error_after, s.check_after) for s in b.sites]
    assert a.output_error_after == b.output_error_after < a.output_error_before
    assert a.bn_matched == b.bn_matched


def test_a_module_called_twice_rules_the_lockstep_out() -> None:
    gm = fxrewrite.trace(SharedConv())
    assert not lockstep_ok(gm, ["shared"]) and lockstep_ok(gm, ["free", "a"])
