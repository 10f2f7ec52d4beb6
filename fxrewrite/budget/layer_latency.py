"""Measured per-layer latency for latency budgets: one figure per distinct layer configuration and backend, cached.

A *configuration* (``LayerConfig``) is everything one site's latency depends on: the input shape, the conv's
hyper-parameters and dtype, and the form + options that replace it (``"keep"`` for the original conv). Sites of the
same shape share their figures, so resnet18's 20 convolutions need 11 distinct originals.

**Measurement.** ``LayerLatency.latencies`` takes configurations grouped by their original conv (the *reference*).
Each round of up to ``chunk`` candidates is timed together with the reference on one random input of the site's
input shape: ``warmup`` untimed passes over all modules, then ``runs`` timed passes in round-robin order
(reference, c1, c2, ..., reference, c1, ...), so drift in machine load hits all of them alike; a module's figure is
the median of its runs in milliseconds. The repeats adapt: after 3 runs a round stops once ``round_seconds`` have
passed, and a candidate already 1.5x slower than the reference is not timed again (it will be pruned as not
faster). The modules are built with the pass's ``init=random`` (the weights do not change the time) and run in
eval mode under ``torch.no_grad`` with ``threads`` intra-op threads (default: the current
``torch.get_num_threads()``, stated in ``context()``). Backends:

- ``eager``: contiguous input and modules as built;
- ``channels_last``: modules and input converted to ``torch.channels_last``;
- ``onnxruntime``: every module exported with ``torch.onnx.export`` and run by a CPU session with
  ``intra_op_num_threads = threads`` (needs onnxruntime installed);
- ``cuda``: modules and input on the current GPU, synchronised around every call (needs a GPU);
- ``inductor`` (``torch.compile``): compiling every candidate would take seconds each, so the per-layer figures
  are only a guide, timed eager (the original convs and every candidate): inductor lowers a convolution to the same
  extern kernel eager calls, so a candidate whose kernels are slow in eager stays slow compiled. (Scaling the
  original's time by a candidate's MAC fraction, tried first, assumed every saving realised: on the trained pitch
  model the first such plan measured 1.61x compiled, because oneDNN's depthwise conv with multiplier > 1 is slower
  than the dense conv it replaces.) The whole model is then compiled and timed by ``fxrewrite.budget.whole_model``,
  which decides.

**Normalisation.** A candidate's figure is stored with the reference's median of the same round; its latency is
``ms * reference_ms / reference_ms_same_round``, where ``reference_ms`` is the median over every round that timed the
reference (it is timed again in each round, so one disturbed round does not set the scale). Figures measured in
different rounds (or processes) are thus on one scale per original conv, and "faster than the original" is decided
within a round.

**Cache.** Figures are cached per process (always) and on disk when ``cache=`` (or the environment variable
``FXREWRITE_LATENCY_CACHE``) names a JSON file; a key is the configuration + backend + torch version + device name +
threads, so a cache file can be shared between machines without mixing them. A second plan over the same shapes
measures nothing. ``timer=`` replaces the measurement (tests inject a deterministic one).

>>> from fxrewrite.graph.sites import ConvSpec
>>> spec = ConvSpec(8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, False)
>>> ref = LayerConfig((1, 8, 8, 8), spec, "float32")
>>> cand = ref.replace_form("grouped", {"groups": 2})
>>> fake = lambda rnd: [4.0 if c.form == "keep" else 1.5 for c, _ in rnd]
>>> timing = LayerLatency(timer=fake, progress=False)
>>> timing.latencies({ref: [cand]})[cand]
1.5
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.sites import ConvSite, ConvSpec
from fxrewrite.measure.latency import ort_session, time_round_robin
from fxrewrite.passes import pass_class
from fxrewrite.passes.candidates import KEEP
from fxrewrite.util.files import atomic_write_text

__all__ = ["BACKENDS", "KEEP", "LayerConfig", "LayerLatency", "Timer", "build_module",
           "clear_memory_cache", "device_name"]

BACKENDS = ("eager", "channels_last", "onnxruntime", "cuda", "inductor")
CACHE_ENV = "FXREWRITE_LATENCY_CACHE"
_FORMAT = "fxrewrite-layer-latency"
_MEMORY: dict[str, dict[str, Any]] = {}  # key -> {"ms", "reference_ms"} or {"ms", "rounds"}: this process's figures

Builder = Callable[[], nn.Module]
Timer = Callable[[Sequence[tuple["LayerConfig", Builder]]], Sequence[float]]
"""Times one round: ``[(reference, build), (candidate, build), ...]`` -> median milliseconds, in order."""


@dataclass(frozen=True)
class LayerConfig:
    """One distinct layer configuration: input shape, conv hyper-parameters, dtype, form and options."""

    input_shape: tuple[int, ...]
    spec: ConvSpec
    dtype: str
    form: str = KEEP
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, site: ConvSite) -> LayerConfig:
        """The original conv of ``site`` (its shapes must be known)."""
        if site.input_shape is None:
            raise ConfigError(f"site {site.name!r} has no input shape: run fxrewrite.graph.shapes.propagate_shapes "
                              "first")
        dtype = site.dtype if site.dtype != "unknown" else "float32"
        return cls(tuple(int(d) for d in site.input_shape), site.spec, dtype)

    def replace_form(self, form: str, options: Mapping[str, Any]) -> LayerConfig:
        return dataclasses.replace(self, form=form, options=tuple(sorted(options.items())))

    @property
    def reference(self) -> LayerConfig:
        return dataclasses.replace(self, form=KEEP, options=())

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "conv": dataclasses.asdict(self.spec), "dtype": self.dtype,
                "form": self.form, "options": dict(self.options)}

    def describe(self) -> str:
        s = self.spec
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        form = f"{self.form}{{{opts}}}" if opts else self.form
        return (f"{'x'.join(map(str, self.input_shape))} {s.in_channels}->{s.out_channels} "
                f"k{s.kernel_size[0]}x{s.kernel_size[1]} s{s.stride[0]} g{s.groups}: {form}")


def build_module(config: LayerConfig, site: ConvSite | None = None) -> nn.Module:
    """The module a configuration times: the original conv (random weights) or the pass's replacement built with
    ``init=random``, in eval mode. ``site`` is handed to the pass (defaults to a site made from the config)."""
    s = config.spec
    conv = nn.Conv2d(s.in_channels, s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation, s.groups, s.bias,
                     s.padding_mode, dtype=getattr(torch, config.dtype))
    if config.form == KEEP:
        return conv.eval()
    if site is None:
        site = ConvSite("layer", "layer", "module", "Conv2d", s, config.input_shape, None, config.dtype, None, ())
    cls = pass_class(config.form)
    built = cls(**(dict(config.options) | dict(cls.structure_options))).build(site, conv)
    return built.module.eval()


@functools.cache
def device_name(backend: str) -> str:
    """The device a backend's figures belong to: the GPU's name, or the CPU model."""
    if backend == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (unavailable)"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def clear_memory_cache() -> None:
    """Forget this process's figures (the disk cache is untouched)."""
    _MEMORY.clear()


# ----------------------------------------------------------------------------------------------------- timing


def _ort_calls(modules: Sequence[nn.Module], x: torch.Tensor, threads: int) -> tuple[list[Callable[[], Any]], Any]:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ConfigError("latency backend 'onnxruntime' needs onnxruntime (pip install onnxruntime), or choose "
                          "backend='eager'") from exc
    tmp = tempfile.TemporaryDirectory(prefix="fxrewrite-layer-latency-")
    calls = []
    feed = x.numpy()
    for i, m in enumerate(modules):
        session = ort_session(ort, m, (x,), os.path.join(tmp.name, f"m{i}.onnx"), threads)
        name = session.get_inputs()[0].name
        calls.append(functools.partial(session.run, None, {name: feed}))
    return calls, tmp


@dataclass(frozen=True)
class _ModuleTimer:
    """The real measurement of one round on a backend (see the module docstring)."""

    backend: str
    runs: int
    warmup: int
    threads: int
    round_seconds: float = math.inf
    min_runs: int = 3
    drop_above: float = 1.5

    def __call__(self, rnd: Sequence[tuple[LayerConfig, Builder]]) -> list[float]:
        config = rnd[0][0]
        modules = [build() for _, build in rnd]
        x = torch.randn(config.input_shape, dtype=getattr(torch, config.dtype))
        sync: Callable[[], None] = lambda: None  # noqa: E731
        keep_alive = None
        if self.backend == "cuda":
            modules = [m.cuda() for m in modules]
            x = x.cuda()
            sync = torch.cuda.synchronize
        elif self.backend == "channels_last":
            modules = [m.to(memory_format=torch.channels_last) for m in modules]
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            if self.backend == "onnxruntime":
                calls, keep_alive = _ort_calls(modules, x, self.threads)
            else:
                calls = [functools.partial(m, x) for m in modules]
            try:
                return [t * 1e3 for t in self._adaptive(calls, sync)]
            finally:
                if keep_alive is not None:
                    keep_alive.cleanup()


    def _adaptive(self, calls: Sequence[Callable[[], Any]], sync: Callable[[], None]) -> list[float]:
        """Median seconds per call: ``warmup`` rounds, then rounds of one call each (interleaved) until ``runs``;
        after ``min_runs`` it stops once ``round_seconds`` have passed, and a candidate already ``drop_above`` times
        slower than the reference (index 0) is not timed further (it cannot win: it will be pruned as not faster)."""
        times: list[list[float]] = [[] for _ in calls]
        active = list(range(len(calls)))
        start = time.perf_counter()
        for n in range(self.runs):
            for i, t in zip(active, time_round_robin([calls[i] for i in active], 1, self.warmup if n == 0 else 0,
                                                    sync), strict=True):
                times[i].extend(t)
            if n == 0:
                start = time.perf_counter()  # the warm-up is not part of the round's time budget
            if n + 1 >= self.min_runs:
                if time.perf_counter() - start > self.round_seconds:
                    break
                ref = statistics.median(times[0])
                active = [i for i in active if i == 0 or statistics.median(times[i]) <= self.drop_above * ref]
        return [statistics.median(t) for t in times]


# ------------------------------------------------------------------------------------------------------ cache


def _load(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"latency cache {str(path)!r} is not a readable JSON file ({exc}); delete it or point "
                          f"cache= (or ${CACHE_ENV}) elsewhere") from exc
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("entries"), dict):
        raise ConfigError(f"latency cache {str(path)!r} is not a fxrewrite layer-latency cache (format {_FORMAT!r}); "
                          f"delete it or point cache= (or ${CACHE_ENV}) elsewhere")
    return doc["entries"]


def _save(path: Path, entries: Mapping[str, Mapping[str, Any]]) -> None:
    merged = _load(path) | dict(entries)  # another process may have added figures meanwhile
    atomic_write_text(path, json.dumps({"format": _FORMAT, "version": 1, "entries": merged}, indent=1) + "\n")


@dataclass
class LayerLatency:
    """How latency budgets measure layers: ``backend`` (one of ``BACKENDS``), ``runs`` timed runs after ``warmup``
    (median), ``threads`` (None: the current torch setting), ``cache`` (a JSON file; None: the environment variable
    ``FXREWRITE_LATENCY_CACHE`` or memory only), ``progress`` (a tqdm bar on stderr), ``timer`` (replaces the
    measurement), ``chunk`` (candidates per round), ``rank_grid`` (latency mode times only ranks 1-4 and
    2^a, 3 * 2^a: about two per octave, see ``on_rank_grid``), ``round_seconds`` (a round stops after at least 3
    runs once this many seconds have passed, and stops timing a candidate already 1.5x slower than the original:
    it cannot win, so planning stays bounded at large batches). ``measured`` / ``cached`` count configurations
    measured / served from the caches by this object."""

    backend: str = "eager"
    runs: int = 10
    warmup: int = 2
    threads: int | None = None
    cache: str | Path | None = None
    progress: bool = True
    timer: Timer | None = None
    chunk: int = 16
    rank_grid: bool = True
    round_seconds: float = 2.0
    measured: int = field(default=0, init=False)
    cached: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown latency backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.runs < 1 or self.warmup < 0 or self.chunk < 1:
            raise ConfigError(f"LayerLatency needs runs >= 1, warmup >= 0 and chunk >= 1, got runs={self.runs}, "
                              f"warmup={self.warmup}, chunk={self.chunk}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.backend == "cuda" and self.timer is None and not torch.cuda.is_available():
            raise ConfigError("latency backend 'cuda' needs a GPU (torch.cuda.is_available() is False); use "
                              "backend='eager' or 'channels_last' on this machine")

    @property
    def cache_path(self) -> Path | None:
        path = self.cache if self.cache is not None else os.environ.get(CACHE_ENV) or None
        return Path(path) if path is not None else None

    def context(self) -> dict[str, Any]:
        """What a figure depends on besides its configuration (part of every cache key); an injected timer is named
        in it, so its figures never mix with measured ones."""
        out = {"backend": self.backend, "torch": torch.__version__, "device": device_name(self.backend),
               "threads": self.threads or torch.get_num_threads()}
        if self.timer is not None:
            out["timer"] = getattr(self.timer, "__qualname__", type(self.timer).__qualname__)
        return out

    def describe(self) -> dict[str, Any]:
        return self.context() | {"runs": self.runs, "warmup": self.warmup, "round_seconds": self.round_seconds,
                                 "measured": self.measured,
                                 "cached": self.cached, "cache": str(self.cache_path) if self.cache_path else None}

    def key(self, config: LayerConfig, context: Mapping[str, Any] | None = None) -> str:
        """The cache key of a configuration (``context``: ``self.context()``, computed once by callers)."""
        return json.dumps({"config": config.to_dict(), **(context or self.context())}, sort_keys=True, default=str)

    def latencies(self, groups: Mapping[LayerConfig, Iterable[LayerConfig]],
                  builders: Mapping[LayerConfig, Builder] | None = None) -> dict[LayerConfig, float]:
        """Milliseconds for every reference (the keys of ``groups``) and candidate (their values), normalised to
        the reference's stored figure; only figures in neither cache are measured. ``builders`` may give the
        module of a configuration (default ``build_module(config)``)."""
        builders = builders or {}
        context = self.context()
        key = functools.partial(self.key, context=context)
        path = self.cache_path
        disk = _load(path)
        new: dict[str, dict[str, Any]] = {}

        def lookup(k: str) -> dict[str, Any] | None:
            if k in _MEMORY:
                return _MEMORY[k]
            if k in disk:
                _MEMORY[k] = dict(disk[k])
                return _MEMORY[k]
            return None

        work = []
        for ref, cands in groups.items():
            cands = list(dict.fromkeys(c for c in cands if c != ref))
            missing = [c for c in cands if lookup(key(c)) is None]
            ref_missing = lookup(key(ref)) is None
            self.cached += len(cands) - len(missing) + (not ref_missing)
            if missing or ref_missing:
                work.append((ref, missing, ref_missing))
        total = sum(len(m) + r for _, m, r in work)
        if total:
            from fxrewrite.measure.latency import torch_threads
            timer = self.timer or _ModuleTimer(self.backend, self.runs, self.warmup,
                                               self.threads or torch.get_num_threads(), self.round_seconds)
            bar = _bar(self.progress, total, f"layer latency ({self.backend})")
            try:
                with torch_threads(self.threads), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # exporter / tracer chatter for hundreds of tiny modules
                    for ref, missing, ref_missing in work:
                        for start in range(0, max(len(missing), 1), self.chunk):
                            chunk = missing[start:start + self.chunk]
                            rnd = [(c, builders.get(c) or functools.partial(build_module, c)) for c in (ref, *chunk)]
                            ms = [float(t) for t in timer(rnd)]
                            if len(ms) != len(rnd) or not all(t > 0 and t == t for t in ms):
                                raise ConfigError(f"latency timer returned {ms} for {len(rnd)} modules; it must "
                                                  "return one positive figure (ms) per module")
                            done = len(chunk)
                            rounds = [*_MEMORY.get(key(ref), {}).get("rounds", []), ms[0]]
                            new[key(ref)] = _MEMORY[key(ref)] = {"ms": statistics.median(rounds), "rounds": rounds}
                            if ref_missing:
                                ref_missing, done = False, done + 1
                            for c, t in zip(chunk, ms[1:], strict=True):
                                new[key(c)] = _MEMORY[key(c)] = {"ms": t, "reference_ms": ms[0]}
                            self.measured += done
                            if bar is not None:
                                bar.update(done)
            finally:
                if bar is not None:
                    bar.close()
            if path is not None and new:
                _save(path, new)
        out: dict[LayerConfig, float] = {}
        for ref, cands in groups.items():
            ref_ms = _MEMORY[key(ref)]["ms"]
            out[ref] = ref_ms
            for c in cands:
                entry = _MEMORY[key(c)]
                out[c] = entry["ms"] * ref_ms / entry["reference_ms"] if "reference_ms" in entry else entry["ms"]
        return out


def on_rank_grid(rank: int) -> bool:
    """Ranks latency mode times by default: 1-4, then 2^a and 3 * 2^a (6, 8, 12, 16, 24, ...).

    >>> [r for r in range(1, 50) if on_rank_grid(r)]
    [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    """
    if rank <= 4:
        return rank >= 1
    odd = rank
    while odd % 2 == 0:
        odd //= 2
    return odd in (1, 3)


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="config", leave=False, disable=None)
