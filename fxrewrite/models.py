"""Model specs: strings the CLI resolves into ``nn.Module``s.

- ``torchvision:NAME`` - a torchvision model with random weights (no download), e.g. ``torchvision:resnet18``;
- ``package.module:factory`` - imports ``package.module`` and calls ``factory(**kwargs)``. This runs that code,
  like ``torch.hub``'s trust flag: only use specs you trust.

>>> type(load_model("torchvision:resnet18")).__name__
'ResNet'
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import operator
from collections.abc import Mapping
from typing import Any

from torch import nn

from fxrewrite.errors import ModelLoadError


def load_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Resolve a model spec into an ``nn.Module`` in eval mode (see the module docstring for the forms)."""
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if not sep or not name or not source:
        hint = f" (did you mean 'torchvision:{spec}'?)" if not sep and _is_torchvision_name(spec) else ""
        raise ModelLoadError(f"model spec {spec!r} must be 'torchvision:NAME' or 'package.module:factory'{hint}")
    model = _torchvision(name, kwargs) if source == "torchvision" else _factory(source, name, kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import torchvision
    except ImportError as exc:
        raise ModelLoadError("torchvision is not installed; `pip install torchvision`") from exc
    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise ModelLoadError(f"torchvision has no model {name!r}; closest: {', '.join(close) or 'none'}")
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
