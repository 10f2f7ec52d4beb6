"""Shape propagation: one pass of FakeTensors through a GraphModule, results in ``node.meta["val"]``.

No real compute and no allocation: parameters are converted to fake tensors, so a model on the meta device or one
too big to run (regnet_y_128gf) propagates in seconds.

>>> import torch
>>> from fxrewrite.capture import trace
>>> gm = trace(torch.nn.Conv2d(3, 8, 3, stride=2))
>>> propagate_shapes(gm, (torch.randn(1, 3, 32, 32),))
>>> tuple(list(gm.graph.nodes)[1].meta["val"].shape)
(1, 8, 15, 15)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxrewrite.errors import FxRewriteError


def fake_mode() -> FakeTensorMode:
    """The fake mode fxrewrite propagates in (real tensors such as parameters are converted on the fly)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Set ``node.meta["val"]`` on every node from one FakeTensor propagation of ``example_inputs``."""
    if not isinstance(example_inputs, tuple | list):
        raise FxRewriteError(
            f"example_inputs must be a tuple of positional inputs (as for torch.export), got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (x,).")
    mode = fake_mode()
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    except Exception as exc:
        node = _failing_node(gm)
        where = f" at node {node}" if node else ""
        raise FxRewriteError(
            f"shape propagation failed{where}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}. "
            "Check that example_inputs have the shapes the model expects.") from exc


def _failing_node(gm: torch.fx.GraphModule) -> str | None:
    """The first node without a propagated value: where propagation stopped."""
    for node in gm.graph.nodes:
        if node.op not in ("output",) and "val" not in node.meta:
            return f"{node.name} ({node.format_node()})"
    return None


def shape_of(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The propagated output shape of a node, or None when it is not a single tensor."""
    val = node.meta.get("val")
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def conv_output_shape(input_shape: tuple[int, ...], conv: torch.nn.Conv2d) -> tuple[int, ...]:
    """Output shape of ``conv`` on an input of ``input_shape`` ((N, C, H, W) or unbatched (C, H, W))."""
    *lead, _, h, w = input_shape
    sizes = []
    for i, size in enumerate((h, w)):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        if isinstance(conv.padding, str):
            sizes.append(size if conv.padding == "same" else (size - d * (k - 1) - 1) // s + 1)
        else:
            sizes.append((size + 2 * conv.padding[i] - d * (k - 1) - 1) // s + 1)
    return (*lead, conv.out_channels, *sizes)
