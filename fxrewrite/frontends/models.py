"""Model specs: strings the CLI resolves into models (``resolve_model``; ``load_model`` for the non-file forms).

- ``torchvision:NAME`` - a torchvision model with random weights (no download), e.g. ``torchvision:resnet18``;
- ``torchvision.KIND:NAME`` - the same, restricted to one family of torchvision models (``KIND`` is one of
  ``classification``, ``detection``, ``segmentation``, ``video``, ``quantization``, ``optical_flow``), e.g.
  ``torchvision.detection:fasterrcnn_resnet50_fpn``; a name from another family is an error naming the closest ones
  of this family. Pretrained weights are never downloaded: ``weights=None`` and ``weights_backbone=None``;
- ``timm:NAME`` - ``timm.create_model(NAME, pretrained=False, **kwargs)`` (when timm is installed; no download);
- ``package.module:factory`` - imports ``package.module`` and calls ``factory(**kwargs)``. This runs that code,
  like ``torch.hub``'s trust flag: only use specs you trust;
- ``FILE.pt2`` - a ``torch.export.save``'d program, loaded with ``torch.export.load`` as an ``ExportedProgram``;
- ``FILE.safetensors`` or ``FILE.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` holding a state_dict (or a checkpoint dict
  with the state_dict under ``'state_dict'`` or ``'model'``), together with ``arch=SPEC``: the architecture is built
  from SPEC (random init, ``kwargs`` passed to its factory) and the weights are loaded strictly;
- a ``torch.save``'d full module (a pickle of Python objects) is refused: ``torch.load(weights_only=True)`` cannot
  read it, and unpickling it runs arbitrary code from the file. ``unsafe_load=True`` loads it anyway.

Detection models take a list of ``(C, H, W)`` images, not a batch; ``example_inputs`` builds the right inputs for a
model (or an ``ExportedProgram``) from input shapes.

>>> type(load_model("torchvision:resnet18")).__name__
'ResNet'
>>> torchvision_names("segmentation")[:2]
['deeplabv3_mobilenet_v3_large', 'deeplabv3_resnet101']
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import io
import logging
import operator
import pickletools
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError, ModelLoadError

#: suffixes of the file specs: a torch.export program, a safetensors state_dict, torch.save files
EXPORTED_SUFFIXES = (".pt2",)
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: checkpoint dict entries that hold the state_dict (or, with unsafe_load, the module)
CHECKPOINT_KEYS = ("state_dict", "model")


def load_model(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Resolve a model spec into an ``nn.Module`` in eval mode (see the module docstring for the forms)."""
    kwargs = dict(kwargs or {})
    source, sep, name = spec.partition(":")
    if not sep or not name or not source:
        hint = f" (did you mean 'torchvision:{spec}'?)" if not sep and _is_torchvision_name(spec) else ""
        raise ModelLoadError(f"model spec {spec!r} must be 'torchvision:NAME', 'torchvision.KIND:NAME', "
                             f"'timm:NAME', 'package.module:factory' or a file ({', '.join(_suffixes())}){hint}")
    if source == "torchvision":
        model = _torchvision(name, kwargs)
    elif source.startswith("torchvision."):
        model = _torchvision(name, kwargs, kind=source.removeprefix("torchvision."))
    elif source == "timm":
        model = _timm(name, kwargs)
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


def _timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise ModelLoadError(f"timm:{name} needs timm, which is not installed; `pip install timm`") from exc
    if kwargs.pop("pretrained", False):
        raise ModelLoadError(f"pretrained weights cannot be downloaded here; load a state_dict instead "
                             f"(FILE --arch timm:{name})")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ModelLoadError(f"timm has no model {name!r}; closest: {', '.join(close) or 'none'}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"timm:{name}(**{kwargs}) raised {type(exc).__name__}: {exc}") from exc


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


# ---------------------------------------------------------------------------------------------------------------
# file specs: .pt2 programs, state_dicts (+ an architecture spec), full pickles (refused unless unsafe_load)


def _suffixes() -> tuple[str, ...]:
    return EXPORTED_SUFFIXES + SAFETENSORS_SUFFIXES + TORCH_SUFFIXES


def model_file(spec: str) -> Path | None:
    """The file ``spec`` names (by its suffix), or None for a non-file spec; a named file that does not exist is an
    error.

    >>> model_file("torchvision:resnet18") is None
    True
    """
    path = Path(spec)
    if path.suffix.lower() in _suffixes():
        if not path.is_file():
            raise ModelLoadError(f"no such model file: {spec}")
        return path
    if path.is_file():
        raise ModelLoadError(f"cannot tell the format of model file {path.name!r} from its suffix; rename it to one "
                             f"of {', '.join(_suffixes())}")
    return None


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_model(spec: str, kwargs: Mapping[str, Any] | None = None, *, arch: str | None = None,
                  unsafe_load: bool = False) -> nn.Module | torch.export.ExportedProgram:
    """Any model spec (see the module docstring) -> an ``nn.Module`` in eval mode, or an ``ExportedProgram`` for a
    ``.pt2`` file. ``arch`` is the architecture spec of a state_dict file; ``kwargs`` go to the model factory (of
    ``spec``, or of ``arch``). ``ModelLoadError`` when the model cannot be loaded; ``ConfigError`` when the
    arguments do not fit the spec (a state_dict without ``arch``, ``arch`` for a spec that is not a state_dict).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "conv.pt"
    >>> torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), path)
    >>> resolve_model(str(path), {"in_channels": 3, "out_channels": 8, "kernel_size": 3}, arch="torch.nn:Conv2d")
    Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
    """
    path = model_file(spec)
    if path is None:
        if arch is not None:
            raise ConfigError(f"--arch is for a state_dict file; {spec!r} is a model spec: drop --arch")
        return load_model(spec, kwargs)
    suffix = path.suffix.lower()
    if suffix in EXPORTED_SUFFIXES:
        if arch is not None or kwargs:
            raise ConfigError(f"{path.name} is a torch.export program: it holds its architecture, so --arch and "
                              "--model-kwargs do not apply")
        try:
            with _quiet_logger("torch.export"):  # its warning repeats the traceback the one-line error explains
                return torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"torch.export.load({path.name!r}) failed: {type(exc).__name__}: {exc}") from exc
    content = _read_safetensors(path) if suffix in SAFETENSORS_SUFFIXES else _torch_load(path, unsafe_load)
    if isinstance(content, nn.Module):
        if arch is not None:
            raise ConfigError(f"{path.name} holds a whole {type(content).__name__} module: drop --arch")
        return content.eval()
    if arch is None:
        raise ConfigError(f"{path.name} holds a state_dict ({len(content)} tensors) but no architecture: add --arch "
                          "SPEC, e.g. --arch torchvision:resnet18 (with --model-kwargs for its factory)")
    model = load_model(arch, kwargs)
    load_state_dict_strict(model, content, path.name)
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModelLoadError(f"{path.name} needs safetensors, which is not installed; `pip install safetensors`"
                             ) from exc
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path.name} as safetensors: {type(exc).__name__}: {exc}") from exc


def _torch_load(path: Path, unsafe_load: bool) -> nn.Module | dict[str, torch.Tensor]:
    """The module or state_dict in a ``torch.save`` file; full pickles only with ``unsafe_load``."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        classes = pickled_classes(path)
        if not classes:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot read {path.name} with torch.load: {first}") from exc
        if not unsafe_load:
            more = f" (and {len(classes) - 3} more)" if len(classes) > 3 else ""
            raise ModelLoadError(
                f"refusing to load {path.name}: it is a pickled module (or other Python objects), not a state_dict "
                f"of tensors - it names {', '.join(classes[:3])}{more} - and unpickling it runs arbitrary code from "
                "the file. Pass --unsafe-load (unsafe_load=True) only for a file you trust, or save a state_dict "
                "instead (torch.save(model.state_dict(), PATH)) and load it with --arch SPEC.") from exc
        try:
            content = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelLoadError(f"unpickling {path.name} failed: {type(exc2).__name__}: {exc2} (the classes it "
                                 "names must be importable)") from exc2
    return _module_or_state_dict(content, path.name)


def _module_or_state_dict(content: Any, name: str) -> nn.Module | dict[str, torch.Tensor]:
    if isinstance(content, Mapping):
        entry = next((content[k] for k in CHECKPOINT_KEYS if k in content), None)
        if isinstance(entry, nn.Module | Mapping):
            content = entry
    if isinstance(content, nn.Module):
        return content
    if isinstance(content, Mapping) and content and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        return dict(content)
    what = f"a dict with keys {', '.join(map(repr, list(content)[:5]))}" if isinstance(content, Mapping) else \
        f"a {type(content).__name__}"
    raise ModelLoadError(f"{name} holds {what}, not a state_dict (names -> tensors), a checkpoint with one under "
                         f"{' or '.join(map(repr, CHECKPOINT_KEYS))}, or a module")


def pickled_classes(path: str | Path) -> list[str]:
    """The ``module.Name`` globals a pickle or ``torch.save`` file imports, besides torch's tensor machinery, read
    with ``pickletools`` (nothing is unpickled). Empty when the file is not a pickle.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "m.pt"
    >>> torch.save(torch.nn.ReLU(), path)
    >>> pickled_classes(path)
    ['torch.nn.modules.activation.ReLU']
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
    except (OSError, StopIteration, zipfile.BadZipFile):
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):  # torch's legacy format is several pickles in a row, then raw bytes
        try:
            found += _pickle_globals(stream)
        except Exception:
            break
    return [g for g in dict.fromkeys(found) if not _is_tensor_machinery(g)]


def _pickle_globals(stream: io.BytesIO) -> list[str]:
    """The globals one pickle imports: ``GLOBAL``/``INST`` opcodes, and ``STACK_GLOBAL`` with its two strings
    (followed through the memo)."""
    found: list[str] = []
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    last: Any = None
    for op, arg, _pos in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = last
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(int(arg))
            strings.append(last)
        else:
            last = arg if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name) else None
            if last is not None:
                strings.append(last)
    return found


#: plain Python types that ``torch.save`` files of tensors pickle too
_PLAIN_PYTHON = frozenset({"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "bool", "str",
                           "bytes", "bytearray", "slice", "OrderedDict", "defaultdict", "encode", "_reconstructor"})


def _is_tensor_machinery(name: str) -> bool:
    """Globals of torch's tensor machinery (rebuilds, storages, dtypes) and plain Python types (OrderedDict, set)."""
    module, _, leaf = name.rpartition(".")
    if module in ("builtins", "__builtin__", "collections", "_codecs", "copyreg", "copy_reg"):
        return leaf in _PLAIN_PYTHON
    return module in ("torch", "torch._utils", "torch._tensor", "torch.storage") or name.endswith("Storage")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names a few missing, unexpected and
    wrongly shaped keys and their counts.

    >>> load_state_dict_strict(torch.nn.Conv2d(3, 8, 3), {"weight": torch.zeros(8, 3, 3, 3)}, "w.pt")
    Traceback (most recent call last):
    ...
    fxrewrite.errors.ModelLoadError: w.pt does not fit Conv2d: 1 missing key: bias. Check --arch and --model-kwargs.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} ({'x'.join(map(str, state[k].shape))} in the file, {'x'.join(map(str, v.shape))} in the model)"
             for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = [_few(keys, what) for keys, what in ((missing, "missing key"), (unexpected, "unexpected key"),
                                                    (wrong, "wrongly shaped tensor")) if keys]
    if problems:
        raise ModelLoadError(f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}. Check --arch "
                             "and --model-kwargs.")
    model.load_state_dict(state, strict=True)


def _few(items: Sequence[str], what: str, shown: int = 3) -> str:
    more = ", ..." if len(items) > shown else ""
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''}: {', '.join(items[:shown])}{more}"


def exported_graph_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``ep`` as the GraphModule ``fxrewrite.rewrite`` rewrites for it: unlifted, with its eligible ATen
    convolutions as ``nn.Conv2d`` modules (``exported.to_conv_modules``); what ``fxrewrite.plan`` takes."""
    from fxrewrite.frontends.exported import to_conv_modules
    gm = ep.module()
    to_conv_modules(gm, set(ep.graph_signature.parameters))
    return gm


def is_image_list_model(model: nn.Module) -> bool:
    """Whether ``model`` takes a list of ``(C, H, W)`` images (torchvision's detection models) instead of a batch.

    >>> is_image_list_model(load_model("torchvision:resnet18"))
    False
    """
    transform = getattr(model, "transform", None)
    return type(transform).__name__ == "GeneralizedRCNNTransform"


def example_inputs(model: nn.Module | torch.export.ExportedProgram, shapes: Sequence[Sequence[int]] | None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> tuple[Any, ...]:
    """Random example inputs of the given shapes for ``model``, as a tuple of positional inputs.

    A detection model (``is_image_list_model``) gets one positional input, the list of images: a 4-D shape
    ``(N, C, H, W)`` gives N images of ``(C, H, W)``, a 3-D shape one image. Other models get one tensor per shape
    (``dtype`` defaults to float32). An ``ExportedProgram`` gets one tensor per tensor input of the program, of the
    program's dtype, and ``shapes=None`` takes the shapes it was exported with.

    >>> [tuple(x.shape) for x in example_inputs(torch.nn.Conv2d(3, 8, 3), [(2, 3, 8, 8)])]
    [(2, 3, 8, 8)]
    """
    if isinstance(model, torch.export.ExportedProgram):
        return _exported_inputs(model, shapes, dtype, device)
    if shapes is None:
        raise ConfigError(f"{type(model).__name__} needs input shapes (--input-shape 1,3,224,224)")
    dtype = dtype or torch.float32
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


def _exported_inputs(ep: torch.export.ExportedProgram, shapes: Sequence[Sequence[int]] | None,
                     dtype: torch.dtype | None, device: torch.device | str | None) -> tuple[torch.Tensor, ...]:
    placeholders = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    values = [placeholders.get(name) for name in ep.graph_signature.user_inputs]
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise ConfigError("this ExportedProgram takes non-tensor inputs; call fxrewrite.rewrite(program, "
                          "example_inputs) from Python")
    if shapes is None:
        dynamic = [i for i, v in enumerate(values) if not all(isinstance(d, int) for d in v.shape)]
        if dynamic:
            raise ConfigError(f"input {dynamic[0]} of the program has a dynamic shape {tuple(values[dynamic[0]].shape)}"
                              ": give --input-shape for every input")
        shapes = [tuple(v.shape) for v in values]
    if len(shapes) != len(values):
        raise ConfigError(f"the program takes {len(values)} tensor input(s); {len(shapes)} input shape(s) given")
    dtypes = [v.dtype for v in values]
    if dtype is not None and any(d != dtype for d in dtypes):
        raise ConfigError(f"the program takes {', '.join(map(str, dtypes))} inputs, not {dtype}: drop --dtype")
    return tuple(torch.randn(*s, dtype=d, device=device) for s, d in zip(shapes, dtypes, strict=True))
