"""Shared fixtures. The tiny model zoo is ``tests/models.py`` (import it as ``models``: pytest puts tests/ on the
path); the ``slow`` marker is registered in pyproject.toml."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.maths.factorize import one_thread as _one_torch_thread


@pytest.fixture
def seeded() -> None:
    """Seed torch's generator so random weights and inputs are the same on every run."""
    torch.manual_seed(0)


@pytest.fixture
def traced(seeded: None) -> Callable[..., torch.fx.GraphModule]:
    """``traced(model, *inputs, **capture)``: trace a copy of ``model`` and propagate shapes for ``inputs``."""

    def run(model: nn.Module, *inputs: torch.Tensor, **capture: object) -> torch.fx.GraphModule:
        gm = trace(model, **capture)  # type: ignore[arg-type]
        propagate_shapes(gm, inputs)
        return gm

    return run


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a test module on one torch thread: small convolutions and factorisations run fastest so (intra-op threads
    only spin-wait on a busy 2-core machine). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with _one_torch_thread():
        yield
