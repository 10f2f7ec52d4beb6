"""Tensors a rewrite shares with the user's model until it owns them.

``rewrite`` traces a copy of the model whose modules are new objects but whose parameters and buffers are, at first,
the model's own (``capture.trace(share_tensors=...)``): the weights of the convolutions a pass replaces are only
read and then dropped, so copying them (half the bytes of a ResNet, in freshly faulted pages) is wasted work. Every
other tensor is given its own copy before anything can change it in place, and whatever is still shared after the
passes (a conv no pass replaced, a bias a replacement reuses) is copied then: the returned module never shares a
tensor with the user's model.

On the CPU those copies are lazy (copy-on-write, ``torch._lazy_clone``): the copy and the model's tensor read the same
memory until either is written through torch (an optimizer step, ``copy_``, ``data_ptr()``, ``torch.save``), which
copies the writer's side first, so neither ever sees the other's writes, and a rewritten model used only for
inference never pays for its kept weights twice (resnet152: 120 MB of page-faulted copies, ~30 ms). What bypasses
torch is not seen: memory written through an alias made *before* the rewrite (a ``.numpy()`` view, DLPack) reaches
both. Tensors on other devices (a CUDA graph keeps raw pointers), views of a shared storage, subclasses and storages
torch's allocator did not make (loaded with ``torch.load``, numpy-backed, shared memory) are copied at once, as
``copy.deepcopy`` does.

>>> import copy, torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
>>> shared = SharedTensors(model)
>>> twin = copy.deepcopy(model, shared.memo())
>>> twin[0].weight is model[0].weight, twin[1].running_mean is model[1].running_mean
(True, True)
>>> shared.own(twin, keep={"0"})  # the batch norm's weight, bias and three statistics
5
>>> twin[0].weight is model[0].weight, twin[1].running_mean is model[1].running_mean
(True, False)
>>> shared.own(twin), twin[0].weight is model[0].weight, torch.equal(twin[0].weight, model[0].weight)
(2, False, True)
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

__all__ = ["SharedTensors"]


class SharedTensors:
    """The parameters and buffers of a model that a copy of it may share, and the copies made so far (tensors tied
    to each other stay tied: one copy each, whichever call makes it)."""

    def __init__(self, model: nn.Module) -> None:
        self._originals: dict[int, torch.Tensor] = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self._copies: dict[int, Any] = {}
        # storages that more than one of the tensors use (views of one another): deepcopy keeps them shared
        self._shared_storages = {p for p, n in Counter(_storage_key(t) for t in self._originals.values()).items()
                                 if n > 1}

    def memo(self) -> dict[int, Any]:
        """A ``copy.deepcopy`` memo under which a copy of the model shares every parameter and buffer with it."""
        return dict(self._originals)

    def own(self, module: nn.Module, keep: Collection[str] = ()) -> int:
        """Give ``module`` its own copy of every tensor it still shares with the model, except those held directly
        by the submodules named in ``keep``; returns how many tensors were copied by this call."""
        count = 0
        for qualname, sub in module.named_modules():
            if qualname in keep:
                continue
            for store in (sub._parameters, sub._buffers):
                for name, t in store.items():
                    if isinstance(t, torch.Tensor) and self._originals.get(id(t)) is t:
                        count += id(t) not in self._copies
                        store[name] = self._copy(t)
        return count

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """``copy.deepcopy(t, memo)``; a plain tensor or parameter that alone covers its storage (what ``deepcopy``
        would copy whole) is copied directly (:func:`_copy_of`), without deepcopy's ~17 us of dispatch per buffer."""
        done = self._copies.get(id(t))
        if done is not None:
            return done
        if not _whole_plain(t) or _storage_key(t) in self._shared_storages:
            return copy.deepcopy(t, self._copies)
        with torch.no_grad():
            data = _copy_of(t.detach())
        copied = self._copies[id(t)] = nn.Parameter(data, t.requires_grad) if type(t) is nn.Parameter else data
        return copied


def _whole_plain(t: torch.Tensor) -> bool:
    """A tensor (without autograd state) or a parameter with no Python attributes and no grad, dense, contiguous,
    covering its whole storage, on the CPU or CUDA: what a direct copy reproduces as ``deepcopy`` would."""
    if type(t) is nn.Parameter:
        if t.__dict__ or t.grad is not None:
            return False
    elif type(t) is not torch.Tensor or t.__dict__ or t.requires_grad or t.grad is not None:
        return False
    return (t.layout is torch.strided and not (t.is_quantized or t.is_conj() or t.is_neg())
            and t.device.type in ("cpu", "cuda") and t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _copy_of(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``: lazy (copy-on-write, ``torch._lazy_clone``, torch >= 2.3) where that is safe, else eager.

    Lazy only on the CPU (a CUDA graph keeps raw pointers, which a later write would leave behind) and only for
    storages that torch's allocator made (``resizable()``): one whose memory came from elsewhere (``torch.load``,
    ``torch.export.load``, numpy, ``frombuffer``) has no allocator to materialise the copy with, and torch 2.14
    crashes writing to a lazy copy of it; shared-memory storages make ``_lazy_clone`` raise."""
    lazy_clone = getattr(torch, "_lazy_clone", None)
    if lazy_clone is not None and t.device.type == "cpu" and t.untyped_storage().resizable():
        try:
            return lazy_clone(t)
        except RuntimeError:
            pass
    return t.clone()


def _storage_key(t: torch.Tensor) -> int | None:
    """Which storage a tensor uses, without touching its data (``data_ptr()`` would materialise a lazy copy); None
    where it has none (a wrapper tensor)."""
    try:
        return t.untyped_storage()._cdata or None
    except (RuntimeError, NotImplementedError):
        return None
