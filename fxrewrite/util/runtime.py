"""Where a module lives and how it runs: its tensors, its device, eval mode for a while.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(2, 2))
>>> with eval_mode(m):
...     m[0].training
False
>>> m[0].training, device_of(m)
(True, device(type='cpu'))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter, then every buffer, each once (as ``parameters()`` then ``buffers()``, walking the module tree
    once and building no names)."""
    modules = list(module.modules())
    seen: set[int] = set()
    for store in ("_parameters", "_buffers"):
        for m in modules:
            for t in getattr(m, store).values():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield t


def device_of(module: nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer (None for a module without tensors)."""
    for t in tensors_of(module):
        return t.device
    return None


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode for the duration; each one's own flag is restored afterwards (batch-norm
    statistics are not touched). The flags are set directly: an unlifted ExportedProgram module refuses ``.eval()``."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield
    finally:
        for m, training in flags:
            m.training = training
