"""Sums across processes for statistics gathered under ``torch.distributed`` (no-ops in a single process).

>>> world_size()
1
"""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(*tensors: torch.Tensor) -> None:
    """Sum each tensor in place over the processes of the default group (no-op without torch.distributed)."""
    if is_distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


def world_size() -> int:
    """The number of processes in the default group (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if is_distributed() else 1
