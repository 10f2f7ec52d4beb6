"""The benchmarks' own helpers: what they load into models and time must be what they say."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.bench_fidelity import tensorly_factors
from benchmarks.bench_realised_speed import _backends
from fxrewrite.maths.bottleneck_fit import compose

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensorly_tucker2_factors_compose_to_the_weight_at_full_rank() -> None:
    pytest.importorskip("tensorly")
    weight = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    first, core, last = tensorly_factors(weight, 1, 4)  # rank [4, 4] keeps every channel on both sides: exact
    assert (first.shape, core.shape, last.shape) == ((4, 4, 1, 1), (4, 4, 3, 3), (4, 4, 1, 1))
    torch.testing.assert_close(compose(first, core, last, 1), weight.double())


def test_tensorly_cp_factors_have_the_depthwise_bottleneck_shapes_and_fit() -> None:
    pytest.importorskip("tensorly")
    gen = torch.Generator().manual_seed(1)
    # a weight that is exactly CP of rank 3: sum_r a_r (x) b_r (x) c_r
    a, b, c = torch.randn(5, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.randn(9, 3, generator=gen)
    weight = torch.einsum("or,ir,kr->oik", a, b, c).reshape(5, 4, 3, 3)
    first, core, last = tensorly_factors(weight, None, 3)
    assert (first.shape, core.shape, last.shape) == ((3, 4, 1, 1), (3, 1, 3, 3), (5, 3, 1, 1))
    rel = float((compose(first, core, last, 3) - weight.double()).norm() / weight.norm())
    assert rel < 1e-4


def test_realised_speed_times_each_module_on_the_same_input_per_backend() -> None:
    modules = [nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3))]
    x = torch.randn(1, 3, 8, 8)
    backends = dict(_backends(modules, x, "cpu"))
    assert {"eager contiguous (cpu)", "eager channels_last (cpu)"} <= set(backends)
    for name, calls in backends.items():
        assert len(calls) == 2, name
        outs = [call() for call in calls]
        first = outs[0][0] if isinstance(outs[0], list) else outs[0]
        expected = modules[0](x)
        torch.testing.assert_close(torch.as_tensor(first), expected, atol=1e-5, rtol=1e-4)
