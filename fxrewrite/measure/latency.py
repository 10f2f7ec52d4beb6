"""Measured latency, on request: original vs rewritten, per backend, with the thread count stated.

Each backend times both models on the same inputs: ``warmup`` untimed calls, then ``runs`` timed calls taken
alternately (original, rewritten, original, ...) so drift in machine load hits both alike; the figure is the
median in milliseconds and ``ratio = rewritten / original`` (below 1 means the rewrite is faster). Backends:

- ``eager``: the modules as they are, inputs made contiguous, eval mode, ``torch.no_grad``;
- ``channels_last``: copies of the modules converted with ``.to(memory_format=torch.channels_last)`` and
  channels-last inputs (the originals are not touched);
- ``onnxruntime``: both models exported with ``torch.onnx.export`` and run by an onnxruntime CPU session with
  ``intra_op_num_threads = threads``; skipped with the reason when onnxruntime is not installed or the model is
  not on the CPU.

``per_site=True`` also times every rewritten site on its own (eager): the original convolution and the new
subgraph, each on the input the original model gives that site.

>>> import torch, fxrewrite
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
>>> x = (torch.randn(1, 3, 16, 16),)
>>> new = fxrewrite.rewrite(model, x, passes="depthwise-separable{rank=1}", verify=False).module
>>> lat = measure_latency(model, new, x, runs=3, warmup=1, backends=("eager",))
>>> t = lat.backend("eager")
>>> t.status, t.original_ms > 0, t.ratio == t.rewritten_ms / t.original_ms
('ok', True, True)
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from fxrewrite.errors import ConfigError
from fxrewrite.graph.capture import as_graph_module
from fxrewrite.graph.recorder import SubgraphRunner, ValueRecorder
from fxrewrite.graph.site_nodes import first_input, original_nodes, site_groups
from fxrewrite.util.inputs import example_inputs_tuple
from fxrewrite.util.runtime import device_of, eval_mode

__all__ = ["BACKENDS", "BackendTiming", "LatencyReport", "SiteTiming", "measure_latency"]

BACKENDS = ("eager", "channels_last", "onnxruntime")


@dataclass(frozen=True)
class BackendTiming:
    """Median latency (ms) of both models on one backend; ``status`` is ``ok``, ``skipped`` or ``failed``."""

    backend: str
    status: str
    reason: str = ""
    original_ms: float | None = None
    rewritten_ms: float | None = None
    original_min_ms: float | None = None
    rewritten_min_ms: float | None = None

    @property
    def ratio(self) -> float | None:
        """rewritten / original median latency (None unless both were measured)."""
        if self.original_ms is None or self.rewritten_ms is None or self.original_ms <= 0:
            return None
        return self.rewritten_ms / self.original_ms

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": self.status, "reason": self.reason,
                "original_ms": self.original_ms, "rewritten_ms": self.rewritten_ms,
                "original_min_ms": self.original_min_ms, "rewritten_min_ms": self.rewritten_min_ms,
                "ratio": self.ratio}


@dataclass(frozen=True)
class SiteTiming:
    """Median latency (ms) of one rewritten site on its own: the original conv vs the new subgraph (eager)."""

    site: str
    original_ms: float
    rewritten_ms: float

    @property
    def ratio(self) -> float:
        return self.rewritten_ms / self.original_ms if self.original_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "original_ms": self.original_ms, "rewritten_ms": self.rewritten_ms,
                "ratio": self.ratio}


@dataclass(frozen=True)
class LatencyReport:
    """Latency of the original and the rewritten model per backend (and per site on request)."""

    backends: tuple[BackendTiming, ...]
    sites: tuple[SiteTiming, ...]
    runs: int
    warmup: int
    threads: int
    device: str
    input_shapes: tuple[tuple[int, ...], ...]
    torch_version: str

    def backend(self, name: str) -> BackendTiming:
        for b in self.backends:
            if b.backend == name:
                return b
        raise KeyError(f"backend {name!r} was not measured; measured: {[b.backend for b in self.backends]}")

    def summary(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes) or "none"
        return (f"latency: median of {self.runs} timed runs after {self.warmup} warm-up, {self.threads} thread(s), "
                f"device {self.device}, inputs {shapes}; ratio = rewritten / original (< 1 is faster)")

    def table(self, tablefmt: str = "simple") -> str:
        rows = [[b.backend, _ms(b.original_ms), _ms(b.rewritten_ms),
                 f"{b.ratio:.3f}x" if b.ratio is not None else "-",
                 b.status if b.status == "ok" else f"{b.status}: {b.reason}"] for b in self.backends]
        parts = [self.summary(), tabulate(rows, headers=("backend", "original ms", "rewritten ms", "ratio", "status"),
                                          tablefmt=tablefmt, disable_numparse=True)]
        if self.sites:
            site_rows = [[s.site, _ms(s.original_ms), _ms(s.rewritten_ms), f"{s.ratio:.3f}x"] for s in self.sites]
            parts += ["per site (eager; the original conv vs the new subgraph on the site's input):",
                      tabulate(site_rows, headers=("site", "original ms", "rewritten ms", "ratio"),
                               tablefmt=tablefmt, disable_numparse=True)]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        return {"units": "milliseconds (median)", "runs": self.runs, "warmup": self.warmup, "threads": self.threads,
                "device": self.device, "input_shapes": [list(s) for s in self.input_shapes],
                "torch_version": self.torch_version, "backends": [b.to_dict() for b in self.backends],
                "sites": [s.to_dict() for s in self.sites]}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ConfigError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_round_robin(calls: Sequence[Callable[[], Any]], runs: int, warmup: int,
                     sync: Callable[[], None]) -> list[list[float]]:
    """Seconds per call of each of ``calls``, timed in turn (one call of each per round, so load on the machine
    reaches all of them alike) after ``warmup`` rounds; ``sync`` waits for an accelerator.

    >>> [len(t) for t in time_round_robin([lambda: None, lambda: None], runs=3, warmup=1, sync=lambda: None)]
    [3, 3]
    """
    for _ in range(warmup):
        for call in calls:
            call()
    sync()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(runs):
        for call, out in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            sync()
            out.append(time.perf_counter() - start)
    return times


def _time_pair(a: Callable[[], Any], b: Callable[[], Any], runs: int, warmup: int,
               sync: Callable[[], None]) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b``, timed alternately after ``warmup`` calls of each."""
    ta, tb = time_round_robin((a, b), runs, warmup, sync)
    return ta, tb


def _timing(backend: str, ta: Sequence[float], tb: Sequence[float]) -> BackendTiming:
    return BackendTiming(backend, "ok", "", statistics.median(ta) * 1e3, statistics.median(tb) * 1e3,
                         min(ta) * 1e3, min(tb) * 1e3)


def _channels_last(x: Any) -> Any:
    return x.contiguous(memory_format=torch.channels_last) if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _contiguous(x: Any) -> Any:
    return x.contiguous() if isinstance(x, torch.Tensor) else x


def _eager(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...], runs: int, warmup: int,
           sync: Callable[[], None]) -> BackendTiming:
    args = tuple(_contiguous(x) for x in inputs)
    ta, tb = _time_pair(lambda: original(*args), lambda: rewritten(*args), runs, warmup, sync)
    return _timing("eager", ta, tb)


def _channels_last_backend(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...], runs: int,
                           warmup: int, sync: Callable[[], None]) -> BackendTiming:
    a = copy.deepcopy(original).to(memory_format=torch.channels_last).eval()
    b = copy.deepcopy(rewritten).to(memory_format=torch.channels_last).eval()
    args = tuple(_channels_last(x) for x in inputs)
    ta, tb = _time_pair(lambda: a(*args), lambda: b(*args), runs, warmup, sync)
    return _timing("channels_last", ta, tb)


def _onnxruntime(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...], runs: int, warmup: int,
                 threads: int, device: torch.device) -> BackendTiming:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return BackendTiming("onnxruntime", "skipped", "onnxruntime is not installed (pip install onnxruntime)")
    if device.type != "cpu":
        return BackendTiming("onnxruntime", "skipped", f"the model is on {device}; this backend measures the "
                             "CPUExecutionProvider only")
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return BackendTiming("onnxruntime", "skipped", "non-tensor inputs cannot be fed to an ONNX session")
    try:
        with tempfile.TemporaryDirectory(prefix="fxrewrite-latency-") as tmp:
            sessions = [ort_session(ort, m, inputs, os.path.join(tmp, f"{name}.onnx"), threads)
                        for name, m in (("original", original), ("rewritten", rewritten))]
            feeds = [{i.name: x.detach().cpu().numpy() for i, x in zip(s.get_inputs(), inputs, strict=True)}
                     for s in sessions]
            ta, tb = _time_pair(lambda: sessions[0].run(None, feeds[0]), lambda: sessions[1].run(None, feeds[1]),
                                runs, warmup, lambda: None)
    except Exception as exc:  # export or session failures are reported, never raised: the other backends stand
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BackendTiming("onnxruntime", "failed", f"{type(exc).__name__}: {first}")
    return _timing("onnxruntime", ta, tb)


def ort_session(ort: Any, model: nn.Module, inputs: tuple[Any, ...], path: str, threads: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it is fast and needs no onnxscript
        try:
            torch.onnx.export(model, inputs, path, dynamo=False)
        except Exception:
            torch.onnx.export(model, inputs, path, dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _per_site(original: nn.Module, rewritten: nn.Module, inputs: tuple[Any, ...], runs: int, warmup: int,
              sync: Callable[[], None]) -> tuple[SiteTiming, ...]:
    ref_gm, new_gm = as_graph_module(original), as_graph_module(rewritten)
    groups = site_groups(new_gm)
    originals = original_nodes(ref_gm, groups)
    wanted = {name: node for name, node in originals.items() if first_input(node) is not None}
    input_names: dict[str, list[str]] = {}  # input node -> the sites reading it (indexed: linear in the sites)
    for name, node in wanted.items():
        input_names.setdefault(first_input(node).name, []).append(name)  # type: ignore[union-attr]
    site_inputs: dict[str, Any] = {}

    def record(node: torch.fx.Node, value: Any) -> None:
        for site in input_names.get(node.name, ()):
            site_inputs[site] = value

    ValueRecorder(ref_gm, set(input_names), record).run(*inputs)
    out = []
    for site, nodes in groups.items():
        if site not in site_inputs:
            continue
        x = site_inputs[site]
        before = SubgraphRunner(ref_gm, [wanted[site]], first_input(wanted[site]))  # type: ignore[arg-type]
        after = SubgraphRunner(new_gm, nodes, first_input(nodes[0]))  # type: ignore[arg-type]
        ta, tb = _time_pair(lambda b=before, x=x: b(x), lambda a=after, x=x: a(x), runs, warmup, sync)
        out.append(SiteTiming(site, statistics.median(ta) * 1e3, statistics.median(tb) * 1e3))
    return tuple(out)


def measure_latency(original: nn.Module, rewritten: nn.Module, example_inputs: Any, *, runs: int = 20,
                    warmup: int = 3, backends: Sequence[str] = ("eager", "channels_last"),
                    threads: int | None = None, per_site: bool = False) -> LatencyReport:
    """Median latency of ``original`` and ``rewritten`` per backend (see the module docstring).

    ``threads`` sets ``torch.set_num_threads`` (and the onnxruntime intra-op threads) for the measurement and is
    restored afterwards; None keeps the current setting. The thread count used is in the report. Models run in eval
    mode under ``torch.no_grad``; each submodule's train/eval flag is restored afterwards.
    """
    inputs = example_inputs_tuple(example_inputs)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown latency backend(s) {unknown}; valid: {', '.join(BACKENDS)}")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = device_of(original) or torch.device("cpu")
    if device.type == "meta":
        raise ConfigError("cannot time a model on the meta device; build it on a real device first")
    sync = _sync(device)
    results: list[BackendTiming] = []
    with torch_threads(threads) as used, eval_mode(original, rewritten), torch.no_grad():
        for backend in dict.fromkeys(backends):
            if backend == "eager":
                results.append(_eager(original, rewritten, inputs, runs, warmup, sync))
            elif backend == "channels_last":
                results.append(_channels_last_backend(original, rewritten, inputs, runs, warmup, sync))
            else:
                results.append(_onnxruntime(original, rewritten, inputs, runs, warmup, used, device))
        sites = _per_site(original, rewritten, inputs, runs, warmup, sync) if per_site else ()
    shapes = tuple(tuple(int(d) for d in x.shape) for x in inputs if isinstance(x, torch.Tensor))
    return LatencyReport(tuple(results), sites, runs, warmup, used, str(device), shapes, torch.__version__)
