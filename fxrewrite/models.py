"""Model specs: strings the CLI resolves into ``nn.Module``s.

- ``torchvision:NAME`` - a torchvision model with random weights (no download), e.g. ``torchvision:resnet18``;
- ``torchvision.KIND:NAME`` - the same, restricted to one family of torchvision models (``KIND`` is one of
  ``classification``, ``detection``, ``segmentation``, ``video``, ``quantization``, ``optical_flow``), e.g.
  ``torchvision.detection:fasterrcnn_resnet50_fpn``; a name from another family is an error naming the closest ones
  of this family. Pretrained weights are never downloaded: ``weights=None`` and ``weights_backbone=None``;
- ``package.module:factory`` - imports ``package.module`` and calls ``factory(**kwargs)``. This runs that code,
  like ``torch.hub``'s trust flag: only use specs you trust.

Detection models take a list of ``(C, H, W)`` images, not a batch; ``example_inputs`` builds the right inputs for a
model from input shapes.

>>> type(load_model("torchvision:resnet18")).__name__
'ResNet'
>>> torchvision_names("segmentation")[:2]
['deeplabv3_mobilenet_v3_large', 'deeplabv3_resnet101']
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ModelLoadError


def load_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Resolve a model spec into an ``nn.Module`` in eval mode (see the module docstring for the forms)."""
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if not sep or not name or not source:
        hint = f" (did you mean 'torchvision:{spec}'?)" if not sep and _is_torchvision_name(spec) else ""
        raise ModelLoadError(f"model spec {spec!r} must be 'torchvision:NAME', 'torchvision.KIND:NAME' or "
                             f"'package.module:factory'{hint}")
    if source == "torchvision":
        model = _torchvision(name, kwargs)
    elif source.startswith("torchvision."):
        model = _torchvision(name, kwargs, kind=source.removeprefix("torchvision."))
    else:
        model = _factory(source, name, kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


KINDS = ("classification", "detection", "segmentation", "video", "quantization", "optical_flow")


def torchvision_names(kind: str | None = None) -> list[str]:
    """The torchvision model names of one family (``KINDS``; classification is ``torchvision.models`` itself), or
    all of them with ``kind=None``."""
    try:
        import torchvision
    except ImportError as exc:
        raise ModelLoadError("torchvision is not installed; `pip install torchvision`") from exc
    if kind is None:
        return list(torchvision.models.list_models())
    if kind not in KINDS:
        raise ModelLoadError(f"unknown torchvision model family {kind!r}; valid: {', '.join(KINDS)}")
    module = torchvision.models if kind == "classification" else getattr(torchvision.models, kind)
    return list(torchvision.models.list_models(module=module))


def _torchvision(name: str, kwargs: dict[str, Any], kind: str | None = None) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelLoadError("torchvision is not installed; `pip install torchvision`") from exc
    available = torchvision_names(kind)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        family = f" in family {kind!r}" if kind else ""
        raise ModelLoadError(f"torchvision has no model {name!r}{family}; closest: {', '.join(close) or 'none'}")
    if "weights" in kwargs and kwargs["weights"] is not None:
        raise ModelLoadError("pretrained weights cannot be downloaded here; load a state_dict instead")
    if kwargs.get("weights_backbone") is not None:
        raise ModelLoadError("pretrained backbone weights cannot be downloaded here; load a state_dict instead")
    kwargs.setdefault("weights", None)
    builder = torchvision.models.get_model_builder(name)
    try:
        accepted = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        accepted = {}
    if "weights_backbone" in accepted:  # detection / segmentation: the default backbone weights would download
        kwargs.setdefault("weights_backbone", None)
    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", False)
    try:
        return torchvision.models.get_model(name, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"torchvision:{name}(**{kwargs}) raised {type(exc).__name__}: {exc}") from exc


def _is_torchvision_name(name: str) -> bool:
    try:
        import torchvision
    except ImportError:
        return False
    return name in torchvision.models.list_models()


def _factory(module_name: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for model spec {module_name}:{attr}: {exc}") from exc
    try:
        factory = operator.attrgetter(attr)(module)  # "pkg.mod:Class.build" works too
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=3)
        raise ModelLoadError(f"module {module_name!r} has no attribute {attr!r}; closest: "
                             f"{', '.join(close) or 'none'}") from None
    if isinstance(factory, nn.Module):
        return factory
    if not callable(factory):
        raise ModelLoadError(f"{module_name}:{attr} is neither an nn.Module nor a callable factory")
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{module_name}:{attr}(**{kwargs}) raised {type(exc).__name__}: {exc}") from exc


def is_image_list_model(model: nn.Module) -> bool:
    """Whether ``model`` takes a list of ``(C, H, W)`` images (torchvision's detection models) instead of a batch.

    >>> is_image_list_model(load_model("torchvision:resnet18"))
    False
    """
    transform = getattr(model, "transform", None)
    return type(transform).__name__ == "GeneralizedRCNNTransform"


def example_inputs(model: nn.Module, shapes: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> tuple[Any, ...]:
    """Random example inputs of the given shapes for ``model``, as a tuple of positional inputs.

    A detection model (``is_image_list_model``) gets one positional input, the list of images: a 4-D shape
    ``(N, C, H, W)`` gives N images of ``(C, H, W)``, a 3-D shape one image. Other models get one tensor per shape.

    >>> [tuple(x.shape) for x in example_inputs(torch.nn.Conv2d(3, 8, 3), [(2, 3, 8, 8)])]
    [(2, 3, 8, 8)]
    """
    if not is_image_list_model(model):
        return tuple(torch.randn(*s, dtype=dtype, device=device) for s in shapes)
    images = []
    for s in shapes:
        if len(s) not in (3, 4):
            raise ModelLoadError(f"{type(model).__name__} takes a list of (C, H, W) images; input shape {tuple(s)} "
                                 "is neither (C, H, W) nor (N, C, H, W)")
        n = 1 if len(s) == 3 else int(s[0])
        images += [torch.rand(*s[-3:], dtype=dtype, device=device) for _ in range(n)]
    return (images,)
