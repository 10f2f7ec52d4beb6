"""copy_module is copy.deepcopy: the same structure, types, values, sharing and ties, on real models and on the
modules that need deepcopy's own path (parametrizations, custom copying, lists, cycles)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from fxrewrite.graph.module_copy import copy_module
from fxrewrite.graph.ownership import SharedTensors


def _shape(obj: Any, seen: dict[int, int]) -> Any:
    """A canonical picture of ``obj``: types, values and which objects are the same object (numbered in visiting
    order), so two copies with equal pictures are equal and share exactly the same things among themselves."""
    if type(obj) in (type(None), int, float, bool, str, bytes, complex, type, torch.dtype, torch.device):
        return ("atom", obj)
    if callable(obj) and not isinstance(obj, nn.Module):
        return ("callable", getattr(obj, "__qualname__", type(obj).__name__))
    if id(obj) in seen:
        return ("same-as", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if isinstance(obj, torch.Tensor):
        return (type(obj).__name__, obj.dtype, tuple(obj.shape), obj.requires_grad, obj.detach().flatten().tolist())
    if isinstance(obj, dict):
        return (type(obj).__name__, [(k, _shape(v, seen)) for k, v in obj.items()])
    if isinstance(obj, list | tuple):
        return (type(obj).__name__, [_shape(v, seen) for v in obj])
    if isinstance(obj, set | frozenset):
        return (type(obj).__name__, sorted(map(repr, obj)))
    if hasattr(obj, "__dict__"):
        return (type(obj).__name__, _shape(vars(obj), seen))
    return ("other", repr(obj))


def _objects(obj: Any, out: dict[int, Any]) -> dict[int, Any]:
    """Every mutable object reachable from ``obj`` through dicts, lists, tuples and instance dicts."""
    if id(obj) in out or type(obj) in (type(None), int, float, bool, str, bytes, tuple) or (callable(obj) and not \
            isinstance(obj, nn.Module)):
        return out
    out[id(obj)] = obj
    children = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | set)
                else vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor) else ())
    for child in children:
        _objects(child, out)
    return out


class _Listy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.sizes = [1, 2, [3]]  # a mutable attribute: copied, never shared
        self.pair = (1, [2])  # a tuple holding a mutable object: a new tuple
        self.atoms = (1, "a")  # a tuple of atoms: kept, as deepcopy keeps it
        self.scale = torch.tensor(2.0)  # a plain tensor attribute, not a buffer
        self.me = self  # a cycle through the module itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale


class _OwnCopy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> _OwnCopy:
        out = _OwnCopy()
        out.lin = copy.deepcopy(self.lin, memo)
        out.copies = self.copies + 1
        return out


def _shared_and_tied() -> nn.Module:
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(OrderedDict(a=shared, b=nn.ReLU(), c=shared, d=nn.Conv2d(3, 3, 1), e=_Listy(),
                                      f=_OwnCopy(), g=nn.BatchNorm2d(3)))
    model.d.weight = nn.Parameter(torch.randn(3, 3, 1, 1))
    model.h = nn.Conv2d(3, 3, 1)
    model.h.weight = model.d.weight  # tied
    model.d.register_forward_hook(lambda m, i, o: o)
    model.g.register_forward_pre_hook(lambda m, i: None)
    torch.nn.utils.parametrizations.weight_norm(model.a)  # a parametrized class: deepcopy's own path
    return model


CASES = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
    "shared, tied, hooked, parametrized, custom": _shared_and_tied,
}


@pytest.mark.parametrize("name", CASES)
def test_equals_deepcopy(name: str) -> None:
    torch.manual_seed(0)
    model = CASES[name]()
    fast, reference = copy_module(model), copy.deepcopy(model)
    assert _shape(fast, {}) == _shape(reference, {})
    original = _objects(model, {})
    assert not set(_objects(fast, {})) & set(original)  # nothing mutable is shared with the input
    x = torch.randn(1, 3, 16, 16)
    if name != "shared, tied, hooked, parametrized, custom":
        model.eval(), fast.eval()
        torch.testing.assert_close(fast(x), model(x), rtol=0, atol=0)


def test_cases_take_both_paths() -> None:
    """The mixed model really holds what the fast path must hand to deepcopy, and keeps ties and sharing."""
    model = _shared_and_tied()
    fast = copy_module(model)
    assert fast.a is fast.c and fast.a is not model.a
    assert fast.h.weight is fast.d.weight and fast.d.weight is not model.d.weight
    assert fast.f.copies == 1  # its own __deepcopy__ ran
    assert fast.e.me is fast.e and fast.e.sizes == [1, 2, [3]] and fast.e.sizes[2] is not model.e.sizes[2]
    assert fast.e.pair == (1, [2]) and fast.e.pair[1] is not model.e.pair[1] and fast.e.atoms is model.e.atoms
    assert type(fast.a).__name__ == type(model.a).__name__ == "ParametrizedConv2d"
    assert len(fast.d._forward_hooks) == 1 and len(fast.g._forward_pre_hooks) == 1


def test_shared_tensor_memo() -> None:
    """Under SharedTensors' memo the copy's parameters and buffers are the model's own, as with deepcopy."""
    model = torchvision.models.resnet18()
    fast = copy_module(model, SharedTensors(model).memo())
    pairs = list(zip(fast.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values(),
                     strict=True))
    assert len(pairs) == 122 and all(a is b for a, b in pairs)
    assert all(a is not b for a, b in zip(fast.modules(), model.modules(), strict=True))
