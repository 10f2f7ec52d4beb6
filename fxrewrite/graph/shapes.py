"""Shape propagation: one pass of FakeTensors through a GraphModule, results in ``node.meta["val"]``.

No real compute and no allocation: parameters are converted to fake tensors, so a model on the meta device or one
too big to run (regnet_y_128gf) propagates in seconds. Shape-preserving modules (batch/layer norm, activations,
dropout) take a shortcut: their output is ``empty_like`` their input, which skips fake batch norm's slow
decomposition.

>>> import torch
>>> from fxrewrite.graph.capture import trace
>>> gm = trace(torch.nn.Conv2d(3, 8, 3, stride=2))
>>> propagate_shapes(gm, (torch.randn(1, 3, 32, 32),))
>>> tuple(list(gm.graph.nodes)[1].meta["val"].shape)
(1, 8, 15, 15)
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxrewrite.errors import ConfigError
from fxrewrite.util.runtime import submodule


def fake_mode() -> FakeTensorMode:
    """The fake mode fxrewrite propagates in (real tensors such as parameters are converted on the fly)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


_DATA_DEPENDENT = (DataDependentOutputException, DynamicOutputShapeException, GuardOnDataDependentSymNode)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Set ``node.meta["val"]`` on every node from one FakeTensor propagation of ``example_inputs``.

    Only when a node needs the *values* of its inputs (a leaf module with data-dependent control flow, kept opaque
    with ``leaf_modules``) does it fall back to one real forward of ``example_inputs`` under ``torch.no_grad`` (with a
    warning). Buffers a training-mode forward updates (batch-norm statistics and counters) are restored afterwards, so
    ``gm``'s state is unchanged. Raises ``ConfigError`` naming the node where propagation stopped. An example input
    on the meta device stands for one of its shape on the model's device: shapes without allocating the input.
    """
    if not isinstance(example_inputs, tuple | list):
        raise ConfigError(
            f"example_inputs must be a tuple of positional inputs (as for torch.export), got "
            f"{type(example_inputs).__name__}; wrap a single tensor as (x,).")
    for node in gm.graph.nodes:
        node.meta.pop("val", None)  # a stale value would hide where a new propagation stopped
    saved = _save_buffers(gm)
    try:
        _propagate(gm, example_inputs)
    finally:
        _restore_buffers(gm, saved)


def _save_buffers(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Copies of the buffers a forward may update in place (batch-norm statistics, spectral-norm vectors)."""
    return {name: b.detach().clone() for name, b in gm.named_buffers() if b.device.type != "meta"}


def _restore_buffers(gm: torch.fx.GraphModule, saved: dict[str, torch.Tensor]) -> None:
    # Even a fake propagation updates some real buffers in training mode (batch norm's num_batches_tracked += 1).
    with torch.no_grad():
        for name, b in gm.named_buffers():
            if name in saved and not torch.equal(b, saved[name]):
                b.copy_(saved[name])


# Modules whose output has their input's shape, dtype, device and strides. Fake batch norm runs through slow
# decompositions (most of the propagation time of a ResNet or DenseNet), so these take a shortcut.
_SHAPE_PRESERVING = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU,
                     nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Mish,
                     nn.Identity, nn.Dropout, nn.Dropout2d)


def _preserves_shape(module: nn.Module, x: torch.Tensor) -> bool:
    if type(module) not in _SHAPE_PRESERVING or module._forward_hooks or module._forward_pre_hooks:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        dims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(module)]
        return x.dim() in dims and x.shape[1] == module.num_features
    if isinstance(module, nn.LayerNorm):
        n = len(module.normalized_shape)
        return x.dim() >= n and tuple(x.shape[-n:]) == tuple(module.normalized_shape)
    return True


def _conv_shortcut(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The fake output of a plain ``nn.Conv2d`` on a contiguous 4-d input, from :func:`conv_output_shape` (a
    contiguous tensor, as the kernels give for a contiguous input and weight) without fake dispatch, whose conv
    meta kernel and parameter conversion dominate a propagation; None (dispatch as usual) for anything else."""
    if type(module) is not nn.Conv2d or module._forward_hooks or module._forward_pre_hooks:
        return None
    w, b = module.weight, module.bias
    if (x.dim() != 4 or w.dim() != 4 or not all(type(d) is int for d in x.shape) or w.dtype != x.dtype
            or w.device != x.device or not (_plain_strides(x) and _plain_strides(w))):
        return None
    o, g = module.out_channels, module.groups
    if (tuple(w.shape) != (o, x.shape[1] // g, *module.kernel_size) or x.shape[1] != module.in_channels
            or module.in_channels % g or o % g):
        return None  # a weight that no longer fits the module's attributes: dispatch says what is wrong
    if module.padding_mode != "zeros" or (isinstance(module.padding, str) and any(st != 1 for st in module.stride)):
        return None  # reflect / replicate / circular padding has limits of its own (padding < input size)
    if b is not None and (tuple(b.shape) != (o,) or b.dtype != x.dtype or b.device != x.device):
        return None
    shape = conv_output_shape(tuple(x.shape), module)  # type: ignore[arg-type]
    if any(d <= 0 for d in shape[2:]):
        return None  # dispatch says what is wrong
    if isinstance(x, FakeTensor):  # built around a meta tensor: no dispatch at all (as the rewriter does)
        return _meta_fake(x.fake_mode, shape, _contiguous_strides(shape), x.dtype, x.device)
    return x.new_empty(shape)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``shape`` (a size-0 dimension counts as 1)."""
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(out))


def _plain_strides(t: torch.Tensor) -> bool:
    """Exactly the contiguous strides (``is_contiguous`` also accepts a channels-last tensor whose size-1 dims make
    it ambiguous, which a conv kernel then treats as channels-last)."""
    return tuple(t.stride()) == _contiguous_strides(t.shape)


# Functions whose output has their one tensor input's metadata (elementwise, no type promotion); ``inplace`` is
# the only keyword they may get. And binary elementwise functions whose output (or, in place, the left operand) has
# the metadata of both operands when those agree exactly (shape, strides, dtype, device): no broadcasting, no
# promotion, and the layout TensorIterator keeps for equal dense layouts.
_UNARY_PRESERVING = frozenset({torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu,
                               torch.nn.functional.relu6, torch.nn.functional.silu, torch.nn.functional.gelu,
                               torch.nn.functional.hardswish, torch.nn.functional.hardsigmoid,
                               torch.nn.functional.mish})
_BINARY_PRESERVING = frozenset({operator.add, operator.mul, torch.add, torch.mul})
_BINARY_INPLACE = frozenset({operator.iadd, operator.imul})


def _function_shortcut(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The fake output of an elementwise function whose result has its input's metadata (see above), without fake
    dispatch (which costs ~100x the formula at an example input's size); None (dispatch as usual) otherwise."""
    if target in _UNARY_PRESERVING:
        if (len(args) == 1 and isinstance(args[0], FakeTensor) and _dense(args[0]) and set(kwargs) <= {"inplace"}
                and isinstance(kwargs.get("inplace", False), bool)):
            return args[0] if kwargs.get("inplace") else _fake_copy(args[0])
        return None
    if target in _BINARY_PRESERVING or target in _BINARY_INPLACE:
        if kwargs or len(args) != 2 or not all(isinstance(a, FakeTensor) for a in args):
            return None
        a, b = args
        if (a.shape, a.stride(), a.dtype, a.device) != (b.shape, b.stride(), b.dtype, b.device):
            return None
        if not _dense(a):
            return None  # a view with gaps: TensorIterator picks its own layout
        return a if target in _BINARY_INPLACE else _fake_copy(a)
    return None


def _dense(t: torch.Tensor) -> bool:
    """Contiguous or channels-last: a layout an elementwise result keeps (a view with gaps gets a new one)."""
    return _plain_strides(t) or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _fake_copy(t: FakeTensor) -> FakeTensor:
    """A new FakeTensor with ``t``'s metadata, built around a meta tensor (no fake dispatch)."""
    return _meta_fake(t.fake_mode, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _meta_fake(mode: FakeTensorMode, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> FakeTensor:
    """A FakeTensor of ``mode`` around a new meta tensor. The meta tensor is made with the fake mode unset: inside
    it, even ``torch.empty(device="meta")`` goes through fake dispatch (most of a propagation's time)."""
    with unset_fake_temporarily():
        meta = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return FakeTensor(mode, meta, device)


class _FakeProp(FakeTensorProp):
    """FakeTensorProp with shortcuts for shape-preserving modules and functions (their output is ``empty_like`` the
    input) and plain 2-d convolutions on contiguous inputs (the output shape from the formula)."""

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            out = (self._module_shortcut(str(n.target), args, kwargs) if n.op == "call_module"
                   else _function_shortcut(n.target, args, kwargs))
            if out is not None:  # FakeTensorProp's snapshot of the value is a fresh fake of the same metadata
                n.meta["val"] = out if out is not _first_arg(args) and not _mutated_later(n) else _fake_copy(out)
                return out
        return super().run_node(n)

    def _module_shortcut(self, target: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        if len(args) != 1 or kwargs or not isinstance(args[0], FakeTensor):
            return None
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return None
        module = submodule(self.module, target)
        if _preserves_shape(module, args[0]) and _dense(args[0]):
            return _fake_copy(args[0])
        return _conv_shortcut(module, args[0])


def _first_arg(args: tuple[Any, ...]) -> Any:
    return args[0] if args else None


def _mutated_later(node: torch.fx.Node) -> bool:
    """Whether a user of ``node`` may change its value in place (an in-place method or function, ``x.t_()``,
    ``resize_``): only then does the recorded value need a snapshot of its own."""
    for user in node.users:
        if user.op in ("call_method", "call_function"):
            name = str(user.target) if user.op == "call_method" else getattr(user.target, "__name__", "")
            if name.endswith("_") and not name.endswith("__"):
                return True
    return False


def fake_propagate(gm: torch.fx.GraphModule, mode: FakeTensorMode, fake_inputs: Sequence[Any]) -> Any:
    """One FakeTensor propagation of already-fake inputs through ``gm`` (``node.meta["val"]`` on every node), with
    the shortcut for shape-preserving modules; returns the output value."""
    return _FakeProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)


def _refake(mode: FakeTensorMode, value: Any) -> Any:
    """A FakeTensor of ``mode`` with the metadata of ``value`` (a fake, meta or real tensor; other values as they
    are), without touching its data."""
    def one(t: torch.Tensor) -> torch.Tensor:
        return _meta_fake(mode, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
    return pytree.tree_map_only(torch.Tensor, one, value)


def propagate_nodes(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], *, real: bool = False) -> None:
    """Re-propagate ``nodes`` (in graph order) alone, from the recorded ``meta["val"]`` of every node they read that
    is not among them: what a change to a few subgraphs costs, instead of a whole propagation. Sets their
    ``meta["val"]``; raises ``KeyError`` for an input without a recorded value, or what the failing node raised.

    ``real=True`` runs the nodes on zero tensors of the recorded metadata (under ``torch.no_grad``) and records
    FakeTensors of their results: the same metadata, much cheaper than FakeTensor dispatch at an example input's
    size (a small conv: microseconds against milliseconds), for a caller that runs the model anyway (numerics); the
    nodes must not depend on their inputs' values (a rewritten conv site does not).

    >>> from fxrewrite.graph.capture import trace
    >>> gm = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)))
    >>> propagate_shapes(gm, (torch.randn(1, 3, 8, 8),))
    >>> gm.get_submodule("1").stride = (2, 2)
    >>> last = list(gm.graph.nodes)[2]
    >>> propagate_nodes(gm, [last])
    >>> tuple(last.meta["val"].shape)
    (1, 4, 3, 3)
    """
    mode = fake_mode()
    if real:
        _propagate_real_nodes(gm, nodes, mode)
        return
    interp = _FakeProp(gm, mode)
    members = set(nodes)
    env: dict[torch.fx.Node, Any] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in env:
                env[arg] = _refake(mode, arg.meta["val"])
    interp.env = env
    with mode:
        for node in nodes:
            env[node] = interp.run_node(node)


def _propagate_real_nodes(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], mode: FakeTensorMode) -> None:
    from fxrewrite.graph.recorder import run_nodes

    def zeros(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device).zero_()

    members = set(nodes)
    env: dict[torch.fx.Node, Any] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg not in env and arg.op != "get_attr":
                env[arg] = pytree.tree_map_only(torch.Tensor, zeros, arg.meta["val"])
    with torch.no_grad():
        run_nodes(gm, nodes, env)
    for node in nodes:
        node.meta["val"] = pytree.tree_map_only(torch.Tensor, lambda t: fake_like(mode, t), env[node])


def fake_like(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """A FakeTensor of ``mode`` with ``t``'s shape, strides, dtype and device, built directly around a meta tensor
    (no fake dispatch, no copy of ``t``'s data).

    >>> f = fake_like(fake_mode(), torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))
    >>> type(f).__name__, tuple(f.shape), f.stride(), f.device.type
    ('FakeTensor', (2, 3, 4, 4), (48, 1, 12, 3), 'cpu')
    """
    return _meta_fake(mode, tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _fake_input(mode: Any, x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """The fake version of an example input; a meta tensor stands for a tensor of its shape and dtype on the model's
    device (so a dry run needs no memory for its inputs, however large)."""
    if x.device.type == "meta" and device is not None:
        with mode:
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
    return mode.from_tensor(x)


def _materialise(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A random tensor for an example input given on the meta device (its shape and dtype only)."""
    if x.device.type != "meta":
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, dtype=x.dtype, device=device)
    return torch.zeros(x.shape, dtype=x.dtype, device=device)


def _propagate(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    mode = fake_mode()
    device = next((t.device for t in (*gm.parameters(), *gm.buffers()) if t.device.type != "meta"), None)
    fake_inputs = [_fake_input(mode, x, device) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        _FakeProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
        return
    except Exception as exc:
        node = _failing_node(gm)
        error = exc
    where = f" at node {node}" if node else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    if is_data_dependent(error):
        if device is not None and not _has_meta_state(gm):  # meta inputs stood for shapes: values are needed now
            example_inputs = [_materialise(x, device) if isinstance(x, torch.Tensor) else x for x in example_inputs]
        real = [x for x in example_inputs if isinstance(x, torch.Tensor)]
        if all(x.device.type != "meta" for x in real) and not _has_meta_state(gm):
            warnings.warn(f"fxrewrite: shape propagation{where} needs real values (data-dependent control flow, "
                          "e.g. in a leaf module); running the model once on example_inputs instead.", stacklevel=2)
            propagate_real(gm, example_inputs, mode)
            return
        raise ConfigError(f"shape propagation{where} needs real values (data-dependent control flow, e.g. in a "
                          f"leaf module: {first}); pass real (not meta) example inputs and weights.") from error
    raise ConfigError(f"shape propagation failed{where}: {first}. Check that example_inputs have the shapes, dtypes "
                      "and device the model expects.") from error


def is_data_dependent(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, _DATA_DEPENDENT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _has_meta_state(gm: torch.fx.GraphModule) -> bool:
    return any(t.device.type == "meta" for t in (*gm.parameters(), *gm.buffers()))


class _RealRecorder(torch.fx.Interpreter):
    """Runs the graph on real tensors and records a fake copy of each node's value (shapes only are kept)."""

    def __init__(self, gm: torch.fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["val"] = pytree.tree_map_only(torch.Tensor, self.mode.from_tensor, result)
        return result


def propagate_real(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: FakeTensorMode) -> None:
    try:
        with torch.no_grad():
            _RealRecorder(gm, mode).run(*example_inputs)
    except Exception as exc:
        node = _failing_node(gm)
        raise ConfigError(f"shape propagation failed{f' at node {node}' if node else ''}: {exc}. Check that "
                          "example_inputs have the shapes, dtypes and device the model expects.") from exc


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


def step_output_shape(input_shape: tuple[int, ...], step: torch.nn.Module,
                      dtype: torch.dtype = torch.float32) -> tuple[int, ...]:
    """Output shape of one step of a replacement: a Conv2d by :func:`conv_output_shape`, anything else (a shape-only
    step such as a channel repeat) by running it on a meta tensor.

    >>> step_output_shape((1, 4, 8, 8), torch.nn.Conv2d(4, 6, 3))
    (1, 6, 6, 6)
    >>> step_output_shape((1, 4, 8, 8), torch.nn.Flatten())
    (1, 256)
    """
    if isinstance(step, torch.nn.Conv2d):
        return conv_output_shape(input_shape, step)
    return tuple(step(torch.empty(input_shape, dtype=dtype, device="meta")).shape)
