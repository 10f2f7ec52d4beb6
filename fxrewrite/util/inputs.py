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
