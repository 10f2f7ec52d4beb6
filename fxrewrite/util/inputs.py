"""Inputs as the model takes them: a tuple of positional inputs (as for ``torch.export``), from example inputs or
from one item of calibration data.

>>> import torch
>>> [tuple(t.shape) for t in calibration_inputs(torch.zeros(2, 3))], len(calibration_inputs([1, 2]))
([(2, 3)], 2)
>>> try:
...     example_inputs_tuple(torch.zeros(1))
... except ConfigError as exc:
...     print(str(exc).split(":")[1].strip())
write (x,) for a single tensor (got Tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from fxrewrite.errors import ConfigError

#: maps one item of calibration data (e.g. an (input, label) pair) to the model's positional inputs
InputFn = Callable[[Any], Sequence[Any]]


def example_inputs_tuple(example_inputs: Any, what: str = "example_inputs") -> tuple[Any, ...]:
    """``example_inputs`` as a tuple; a bare tensor or any other non-sequence is a ``ConfigError``."""
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, tuple | list):
        raise ConfigError(f"{what} must be a tuple of positional inputs, as for torch.export: write (x,) for a "
                          f"single tensor (got {type(example_inputs).__name__}).")
    return tuple(example_inputs)


def calibration_inputs(item: Any, input_fn: InputFn | None = None) -> tuple[Any, ...]:
    """One calibration item as the model's positional inputs: ``input_fn(item)``, a tuple/list as is, or a tensor
    as a 1-tuple."""
    if input_fn is not None:
        item = input_fn(item)
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, tuple | list):
        return tuple(item)
    raise ConfigError(f"calibration items must be tuples of positional inputs (or tensors), got "
                      f"{type(item).__name__}; pass input_fn= to map items to inputs (e.g. lambda b: (b[0],) for a "
                      "DataLoader of (input, label) pairs)")


def check_reiterable(data: Iterable[Any], what: str = "calibration data") -> None:
    """Repair, budgets and distillation read the data several times: a one-shot iterator (a generator) is an
    error."""
    if isinstance(data, Iterator) or iter(data) is data:
        raise ConfigError(f"{what} is a one-shot iterator, but it is read several times (once per site); pass a "
                          "list of input tuples or a DataLoader instead of a generator")


def to_device(inputs: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    """The tensors among ``inputs`` moved to ``device`` (unchanged when ``device`` is None)."""
    if device is None:
        return inputs
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def batch_size_of(inputs: tuple[Any, ...]) -> int:
    """The size of dim 0 of the first tensor with a batch dimension (1 when there is none)."""
    t = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return int(t.shape[0]) if t is not None else 1


def _describe(shape: Sequence[int]) -> str:
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


def check_calibration(data: Iterable[Any], example_inputs: Sequence[Any], input_fn: InputFn | None = None) -> None:
    """Every calibration batch must look like the example inputs (same number of inputs, same rank, same channel
    count on dim 1; batch and spatial sizes may differ) and hold only finite values: checked in one pass over the
    data before any fit, so a wrong file is a ``ConfigError`` instead of a failure deep inside a rewritten layer.

    >>> check_calibration([(torch.zeros(4, 3, 8, 8),)], (torch.zeros(1, 3, 16, 16),))
    >>> try:
    ...     check_calibration([(torch.zeros(4, 1, 8, 8),)], (torch.zeros(1, 3, 16, 16),))
    ... except ConfigError as exc:
    ...     print(exc)
    calibration batch 0, input 0 has shape (4,1,8,8); the model takes (N,3,H,W) like its example input (1,3,16,16)
    """
    for i, item in enumerate(data):
        batch = calibration_inputs(item, input_fn)
        if len(batch) != len(example_inputs):
            raise ConfigError(f"calibration batch {i} has {len(batch)} input(s); the model takes "
                              f"{len(example_inputs)} like its example inputs")
        for j, (x, ref) in enumerate(zip(batch, example_inputs, strict=True)):
            if not isinstance(ref, torch.Tensor):
                continue
            if not isinstance(x, torch.Tensor):
                raise ConfigError(f"calibration batch {i}, input {j} is a {type(x).__name__}; the model takes a "
                                  f"tensor like its example input {_describe(ref.shape)}")
            if x.dim() != ref.dim() or (ref.dim() >= 2 and x.shape[1] != ref.shape[1]):
                wanted = "(N," + ",".join([str(int(ref.shape[1])), *"HWDE"[:max(ref.dim() - 2, 0)]]) + ")"
                if ref.dim() < 2:
                    wanted = f"{ref.dim()} dimension(s)"
                raise ConfigError(f"calibration batch {i}, input {j} has shape {_describe(x.shape)}; the model takes "
                                  f"{wanted} like its example input {_describe(ref.shape)}")
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                raise ConfigError(f"calibration batch {i}, input {j} has {bad} non-finite value(s) (NaN or inf); "
                                  "clean the calibration data")
