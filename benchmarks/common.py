"""Shared helpers for the benchmarks: timing (median of N), environment facts, and result files (JSON + Markdown).

Every benchmark writes ``benchmarks/results/<name>.json`` and ``<name>.md``; the README quotes the Markdown. A quick
run (a name ending in ``_quick``, ``make bench-quick``) writes to ``benchmarks/results/quick/`` instead, which git
ignores: a quick run never leaves a checkout dirty.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"  # git-ignored


def median_time(fn: Callable[[], Any], runs: int = 5, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_results(name: str, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                  notes: Sequence[str] = (), extra: dict[str, Any] | None = None) -> str:
    """Write JSON and Markdown results atomically (a ``*_quick`` name to the ignored ``QUICK_RESULTS``); returns the
    Markdown text."""
    folder = QUICK_RESULTS if name.endswith("_quick") else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    env = environment()
    doc = {"benchmark": name, "title": title, "environment": env, "headers": list(headers),
           "rows": [list(r) for r in rows], "notes": list(notes), **(extra or {})}
    md = "\n".join([f"### {title}", "", tabulate(rows, headers=headers, tablefmt="github", floatfmt=".4g"), "",
                    *[f"- {n}" for n in notes],
                    f"- environment: torch {env['torch']}, {env['cpus']} CPUs, {env['torch_threads']} torch threads, "
                    f"{env['date']}", ""])
    for suffix, text in ((".json", json.dumps(doc, indent=2, default=str)), (".md", md)):
        target = folder / f"{name}{suffix}"
        tmp = target.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    return md
