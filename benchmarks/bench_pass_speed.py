"""Pass speed: fxrewrite's own rewrite work vs torch.fx.symbolic_trace, and vs a subgraph_rewriter anchor.

Measured: the time to find sites, decide, factorise (SVD), replace and recompile a depthwise-separable rank-1
rewrite of every eligible conv (``PassManager([DepthwiseSeparable(rank=1)])(gm)`` on an already traced and
shape-propagated copy) - not tracing, not numeric verification. Against: ``torch.fx.symbolic_trace`` of the same
model, and the naive anchor ``torch.fx.subgraph_rewriter.replace_pattern`` doing the same conv -> depthwise +
pointwise replacement, one ``replace_pattern`` call per conv (that API matches one pattern at a time; the conv's
module target is part of the pattern). Medians of repeated runs, side by side in one process, on one torch thread by
default (``--threads``: the factorisation runs on one thread whatever the setting, see ``factorize.one_thread``).

The second table is the path users call: ``fxrewrite.rewrite(model, (x,), passes="depthwise-separable{rank=1}")``
with its default options (capture, shapes, the pass, verification with numerics, the report), and the same with
``verify=False``, side by side with ``torch.fx.symbolic_trace`` and one eager forward pass (``torch.no_grad``) of the
same model, on one thread; its model rows are timed in five fresh processes (the row is the one with the median
ratio, the last column lists every process's), its chain rows in this one give the time per conv and the log-log
slope of the whole path's time in the conv count (linear: 1.0).

Run alone: ``.venv/bin/python -m benchmarks.bench_pass_speed [--quick] [--threads N] [--path-only]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import fxrewrite
from benchmarks.common import median_time, write_results
from fxrewrite.graph.capture import trace
from fxrewrite.graph.shapes import propagate_shapes
from fxrewrite.passes import DepthwiseSeparable, PassManager


class ConvChain(nn.Module):
    """``n`` 3x3 convolutions (16 channels) with ReLUs: a synthetic graph whose size is the conv count."""

    def __init__(self, n: int, channels: int = 16) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x


def _prepared(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    gm = trace(model)
    propagate_shapes(gm, (x,))
    return gm


def fxrewrite_time(model: nn.Module, x: torch.Tensor, runs: int) -> tuple[float, int]:
    base = _prepared(model, x)
    copies = [copy.deepcopy(base) for _ in range(runs + 1)]
    it = iter(copies)
    manager = PassManager([DepthwiseSeparable(rank=1)])
    changed = sum(r.status == "rewritten" for r in manager(copy.deepcopy(base)).records)
    return median_time(lambda: manager(next(it)), runs=runs, warmup=1), changed


def replace_pattern_anchor(gm: torch.fx.GraphModule) -> int:
    """Conv -> depthwise + pointwise with one ``subgraph_rewriter.replace_pattern`` per conv (same factorisation)."""
    from torch.fx import subgraph_rewriter

    from fxrewrite.graph.sites import find_sites
    from fxrewrite.maths.factorize import depthwise_separable
    count = 0
    for site in find_sites(gm):
        if site.reason_for("depthwise-separable") is not None:
            continue
        conv = gm.get_submodule(site.name)
        f = depthwise_separable(conv.weight.detach(), source_groups=conv.groups, rank=1)
        dw = nn.Conv2d(conv.in_channels, conv.in_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.in_channels, bias=False, padding_mode=conv.padding_mode)
        pw = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None)
        with torch.no_grad():
            dw.weight.copy_(f.spatial)
            pw.weight.copy_(f.pointwise)
            if conv.bias is not None:
                pw.bias.copy_(conv.bias)
        pattern_root, replacement_root = nn.Module(), nn.Module()
        _put(pattern_root, site.name, conv)
        _put(replacement_root, site.name + "_dw", dw)
        _put(replacement_root, site.name + "_pw", pw)
        pattern, replacement = torch.fx.Graph(), torch.fx.Graph()
        p_in = pattern.placeholder("x")
        pattern.output(pattern.call_module(site.name, (p_in,)))
        r_in = replacement.placeholder("x")
        replacement.output(replacement.call_module(site.name + "_pw",
                                                   (replacement.call_module(site.name + "_dw", (r_in,)),)))
        count += len(subgraph_rewriter.replace_pattern(gm, torch.fx.GraphModule(pattern_root, pattern),
                                                       torch.fx.GraphModule(replacement_root, replacement)))
    gm.recompile()
    return count


def _put(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parts = qualname.split(".")
    for p in parts[:-1]:
        if not hasattr(root, p):
            root.add_module(p, nn.Module())
        root = getattr(root, p)
    root.add_module(parts[-1], module)


#: the column of path_rows' rows that holds rewrite() / (trace + forward)
_RATIO = 5
PATH_PASSES = "depthwise-separable{rank=1}"


def model_cases(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """The models of the default-path table: (name, model, example input)."""
    if quick:
        return [("resnet50 64x64", torchvision.models.resnet50().eval(), torch.randn(1, 3, 64, 64))]
    return [("resnet152 64x64", torchvision.models.resnet152().eval(), torch.randn(1, 3, 64, 64)),
            ("resnet50 224x224", torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224))]


def chain_cases(chains: tuple[int, ...]) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """The chains of the default-path table: (name, chain of n convs, example input)."""
    return [(f"chain-{n}", ConvChain(n).eval(), torch.randn(1, 16, 8, 8)) for n in chains]


def model_rows_in_processes(quick: bool, processes: int, threads: int) -> list[list[Any]]:
    """:func:`path_rows` of the models (7 rounds), once in each of ``processes`` fresh Python processes, one after
    another. Per model, the row is the process whose rewrite() / (trace + forward) ratio is the median, followed by
    every process's ratio, sorted: here one process's rounds agree better with each other than with another
    process's a minute later (resnet152 at 64x64, 15 rounds each, seven processes: medians 4.32-4.91x), so a single
    process's median does not say where the ratio lies."""
    command = [sys.executable, "-m", "benchmarks.bench_pass_speed", "--model-rows", "--threads", str(threads),
               *(["--quick"] if quick else [])]
    runs = [json.loads(subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parent.parent).stdout.splitlines()[-1])
            for _ in range(processes)]
    rows = []
    for per_process in zip(*runs, strict=True):
        by_ratio = sorted(per_process, key=lambda row: row[_RATIO])
        rows.append([*by_ratio[(len(by_ratio) - 1) // 2], " / ".join(f"{row[_RATIO]:.2f}" for row in by_ratio)])
    return rows


def path_rows(cases: list[tuple[str, nn.Module, torch.Tensor]], runs: int) -> list[list[Any]]:
    """One row per case: symbolic_trace, one forward, rewrite() with defaults and with verify=False (medians, ms).
    All four steps of all cases are timed in interleaved rounds (one of each per case per round), so a change of the
    machine's load shifts numerator and denominator alike, and, for the chains, every conv count alike (the slope
    compares rows measured in the same minutes); a full garbage collection before each step keeps one step's garbage
    out of the next one's time."""
    timed = []
    for name, model, x in cases:
        verified = fxrewrite.rewrite(model, (x,), passes=PATH_PASSES)  # also the warm-up
        assert verified.verification is not None and verified.verification.ok, verified.verification
        convs = sum(r.status == "rewritten" for r in verified.report.records)

        def forward(model: nn.Module = model, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                model(x)

        steps = {"trace": lambda m=model: torch.fx.symbolic_trace(m), "forward": forward,
                 "default": lambda m=model, x=x: fxrewrite.rewrite(m, (x,), passes=PATH_PASSES),
                 "plain": lambda m=model, x=x: fxrewrite.rewrite(m, (x,), passes=PATH_PASSES, verify=False)}
        forward()
        timed.append((name, convs, steps, {k: [] for k in steps}))
    for _ in range(runs):
        for _, _, steps, times in timed:
            for key, fn in steps.items():
                gc.collect()  # the previous step's garbage is not charged to this one (rewrite() pauses the collector)
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    rows = []
    for name, convs, steps, times in timed:
        trace_s, forward_s, default_s, plain_s = (statistics.median(times[k]) for k in steps)
        base = trace_s + forward_s
        rows.append([name, convs, trace_s * 1e3, forward_s * 1e3, default_s * 1e3, default_s / base, plain_s * 1e3,
                     plain_s / base, default_s / max(convs, 1) * 1e3])
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    return rows


def path_row(name: str, model: nn.Module, x: torch.Tensor, runs: int) -> list[Any]:
    """:func:`path_rows` of one model."""
    return path_rows([(name, model, x)], runs)[0]


def path_table(quick: bool, chains: tuple[int, ...] = (1000, 3000, 5000), processes: int = 5) -> str:
    load_before = os.getloadavg()[0]
    rows = model_rows_in_processes(quick, processes, torch.get_num_threads())
    # 5 rounds for the chains, every conv count in each round (a chain of 5000 takes ~20 s a round), in this process
    rows += [[*row, ""] for row in path_rows(chain_cases((100, 300) if quick else chains), 5)]
    notes = [f"rewrite() = fxrewrite.rewrite(model, (x,), passes={PATH_PASSES!r}) with default options (capture, "
             "shape propagation, the pass, verification with numerics on the example input, the report); "
             "verify=False leaves the verification out; x / (trace + forward) = its time over symbolic_trace plus "
             "one eager forward (no_grad) of the same model, measured in the same rounds (goal <= 5x). Medians of "
             "interleaved rounds (one of each step per round). Models: 7 rounds in each of "
             f"{processes} fresh processes; the row is the process with the median ratio, the last column every "
             "process's ratio. Chains: 5 rounds in one process, the chains of every length in the same rounds; "
             f"torch intra-op threads = {torch.get_num_threads()}; 1-minute load average {load_before:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after (other processes share the CPUs)."]
    chains = sorted((int(r[0].split("-")[1]), r[4], r[2] + r[3]) for r in rows if r[0].startswith("chain-"))
    pairs = [*itertools.pairwise(chains), *([(chains[0], chains[-1])] if len(chains) > 2 else [])]
    for (n0, t0, b0), (n1, t1, b1) in pairs:
        notes.append(f"log-log slope of rewrite() time, {n0} -> {n1} convs: "
                     f"{math.log(t1 / t0) / math.log(n1 / n0):.3f} (goal <= 1.1; 1.0 is linear); of torch's own "
                     f"symbolic_trace + forward on the same chains: {math.log(b1 / b0) / math.log(n1 / n0):.3f}")
    headers = ["model", "convs rewritten", "symbolic_trace ms", "forward ms", "rewrite() ms", "rewrite() / (trace + "
               "forward)", "verify=False ms", "verify=False / (trace + forward)", "rewrite() ms per conv",
               "rewrite() / (trace + forward), each process"]
    return write_results("rewrite_path_speed" + ("_quick" if quick else ""), "rewrite() as users call it (CPU)",
                         headers, rows, notes)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small subset (resnet50, chains of 100 and 1000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable on a shared 2-core machine)")
    parser.add_argument("--anchor-all", action="store_true",
                        help="also run the replace_pattern anchor on the 1000-conv chain (minutes)")
    parser.add_argument("--path-only", action="store_true",
                        help="only the table of rewrite() as users call it (default options)")
    parser.add_argument("--chains", default="1000,3000,5000",
                        help="conv counts of the chains in the rewrite() table (default 1000,3000,5000)")
    parser.add_argument("--processes", type=int, default=5,
                        help="fresh processes that each time the models of the rewrite() table (default 5; odd)")
    parser.add_argument("--model-rows", action="store_true",
                        help="time the models of the rewrite() table in this process and print their rows as JSON "
                             "(what each of the --processes runs)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model_rows:
        text = json.dumps([path_row(*case, runs=7) for case in model_cases(args.quick)])
        print(text)
        return text
    if args.processes < 1 or args.processes % 2 == 0:
        parser.error(f"--processes must be odd and positive (one process has the median ratio), got {args.processes}")
    path_md = path_table(args.quick, tuple(int(n) for n in args.chains.split(",")), args.processes)
    if args.path_only:
        return path_md
    cases: list[tuple[str, nn.Module, torch.Tensor]] = [
        ("resnet50", torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224))]
    if not args.quick:
        cases += [("resnet152", torchvision.models.resnet152().eval(), torch.randn(1, 3, 224, 224)),
                  ("densenet201", torchvision.models.densenet201().eval(), torch.randn(1, 3, 224, 224))]
    chain_sizes = (100, 1000) if args.quick else (100, 1000, 5000)
    cases += [(f"chain-{n}", ConvChain(n).eval(), torch.randn(1, 16, 8, 8)) for n in chain_sizes]
    # the anchor on the 1000-conv chain takes minutes (161 s, 88x fxrewrite's time, in one run on 2 shared cores):
    # outside `make bench`'s budget, so it runs only with --anchor-all
    anchor_on = {"resnet50"} if args.quick else {"resnet50", "resnet152", "chain-100"}
    if args.anchor_all:
        anchor_on.add("chain-1000")
    rows, per_conv = [], {}
    for name, model, x in cases:
        runs = 3 if name.startswith("chain-5000") or args.quick else 5
        trace_s = median_time(lambda m=model: torch.fx.symbolic_trace(m), runs=runs)
        ours_s, changed = fxrewrite_time(model, x, runs)
        per_conv[name] = ours_s / max(changed, 1)
        anchor_s: float | None = None
        if name in anchor_on:
            base = _prepared(model, x)
            anchor_s = median_time(lambda b=base: replace_pattern_anchor(copy.deepcopy(b)), runs=1, warmup=0)
        # numbers only (None where the anchor was not run), so that every column gets the table's number format
        rows.append([name, changed, trace_s * 1e3, ours_s * 1e3, ours_s / trace_s,
                     anchor_s * 1e3 if anchor_s else None, anchor_s / ours_s if anchor_s else None,
                     per_conv[name] * 1e6])
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    notes = ["fxrewrite = find sites + decide + SVD factorise + replace + recompile (dw-sep rank 1), on a traced, "
             "shape-propagated copy; symbolic_trace = torch.fx.symbolic_trace of the eager model; anchor = "
             "subgraph_rewriter.replace_pattern once per conv (same factors; one run; blank where not run). Medians "
             f"in one run; torch intra-op threads = {torch.get_num_threads()}."]
    if "chain-1000" in per_conv and "chain-5000" in per_conv:
        slope = math.log(per_conv["chain-5000"] * 5000 / (per_conv["chain-1000"] * 1000)) / math.log(5)
        notes.append(f"log-log slope of total rewrite time, 1000 -> 5000 convs: {slope:.3f} (goal <= 1.1)")
    headers = ["model", "convs rewritten", "symbolic_trace ms", "fxrewrite ms", "fxrewrite / trace",
               "replace_pattern ms", "replace_pattern / fxrewrite", "fxrewrite us per conv"]
    md = write_results("pass_speed" + ("_quick" if args.quick else ""), "Pass speed (CPU)", headers, rows, notes)
    return md + "\n" + path_md


if __name__ == "__main__":
    print(main())
