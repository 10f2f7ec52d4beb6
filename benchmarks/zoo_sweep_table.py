"""The zoo sweep on every model, and the table in ``docs/zoo_sweep.md``.

The sweep itself is ``tests/test_zoo_sweep.py`` (its expected failures, with their reasons, live there); CI runs its
structure tier on every model and its numbers tier on a subset. This script runs the structure tier *and* the
numbers tier on every model, exporting every result with ``torch.export``, in parallel worker processes, and writes:

- ``benchmarks/results/zoo_sweep.jsonl``: one JSON outcome per model and tier, appended as each finishes (a run cut
  short keeps what it finished; ``--from-json`` rebuilds the table from such files, several runs merged);
- ``docs/zoo_sweep.md``: the per-family summary and the per-model table.

    python -m benchmarks.zoo_sweep_table                     # everything, on the CPU (hours on 2 cores)
    python -m benchmarks.zoo_sweep_table --tier structure    # the structure tier only (minutes)
    python -m benchmarks.zoo_sweep_table --device cuda --jobs 12 --deadline 480
    python -m benchmarks.zoo_sweep_table --from-json a.jsonl b.jsonl   # the table from saved outcomes

``--deadline`` stops starting work after that many seconds and lists unfinished models as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "zoo_sweep.jsonl"
DOCS = ROOT / "docs" / "zoo_sweep.md"


def _sweep_module() -> Any:
    """tests/test_zoo_sweep.py, imported as a module (it holds the sweep and its expected failures)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import test_zoo_sweep
    return test_zoo_sweep


def _environment(device: str) -> dict[str, Any]:
    import torch
    import torchvision
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
           "device": device, "cpus": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _work(task: tuple[str, str, str, str, int]) -> dict[str, Any]:
    """One (model, tier) in a worker process: the outcome as a JSON-ready dict."""
    name, tier, device, dtype, threads = task
    import torch
    torch.set_num_threads(threads)
    sweep = _sweep_module()
    entry = sweep.BY_NAME[name]
    if tier == "structure":
        outcome = sweep.sweep_structure(entry)
    else:
        outcome = sweep.sweep_numbers(entry, device=device, dtype=getattr(torch, dtype),
                                      export=tuple(sweep.PASSES))
    doc = dataclasses.asdict(outcome)
    doc["environment"] = _environment(device if tier == "numbers" else "meta")
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return doc


def _params(name: str) -> int:
    """Parameter count from a meta build (no memory), to start the largest models first."""
    sweep = _sweep_module()
    try:
        return sum(p.numel() for p in sweep.BY_NAME[name].build("meta").parameters())
    except Exception:
        return 0


def run(names: Sequence[str], tiers: Sequence[str], device: str, dtype: str, jobs: int, deadline: float | None,
        out: Path, max_params: float | None = None, largest_first: bool | None = None) -> list[dict[str, Any]]:
    """Sweep ``names`` x ``tiers`` in ``jobs`` processes; every outcome is appended to ``out`` as it arrives.

    The numbers tier starts the largest models first when several processes share the work (the makespan), and
    the smallest first in one process (the most models by a deadline). Models over ``max_params`` parameters are
    not run in the numbers tier, and are listed as such.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    docs: list[dict[str, Any]] = []
    order = list(names)
    if "numbers" in tiers:
        params = {n: _params(n) for n in names}
        order = sorted(names, key=params.__getitem__, reverse=jobs > 1 if largest_first is None else largest_first)
        if max_params is not None:
            with out.open("a", encoding="utf-8") as sink:
                for n in [n for n in order if params[n] > max_params]:
                    doc = {"name": n, "tier": "numbers", "unfinished": True, "environment": _environment(device),
                           "error": f"not run: {params[n] / 1e6:.0f}M parameters, over this run's --max-params "
                                    f"{max_params / 1e6:.0f}M (memory: the model, its traced copy and the rewritten "
                                    "weights are held at once)"}
                    docs.append(doc)
                    sink.write(json.dumps(doc) + "\n")
            order = [n for n in order if params[n] <= max_params]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    tasks = [(n, t, device, dtype, threads) for t in tiers for n in (order if t == "numbers" else names)]
    start = time.monotonic()
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked workers
    with context.Pool(jobs, maxtasksperchild=4) as pool, out.open("a", encoding="utf-8") as sink:
        pending = [(task, pool.apply_async(_work, (task,))) for task in tasks]
        for task, result in pending:
            left = None if deadline is None else deadline - (time.monotonic() - start)
            try:
                doc = result.get(timeout=max(left, 0.1) if left is not None else None)
            except multiprocessing.TimeoutError:
                doc = {"name": task[0], "tier": task[1], "error": "not finished within the run's time limit",
                       "unfinished": True, "environment": _environment(device)}
            except Exception as exc:  # a worker that died (out of memory, a crash in native code)
                doc = {"name": task[0], "tier": task[1], "error": f"worker failed: {type(exc).__name__}: {exc}",
                       "environment": _environment(device)}
            docs.append(doc)
            sink.write(json.dumps(doc, default=str) + "\n")
            sink.flush()
            status = doc.get("error") or "ok"
            print(f"[{time.monotonic() - start:6.0f}s] {task[1]:9s} {task[0]}: {status}", flush=True)
        pool.terminate()
    return docs


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Outcomes from JSONL files; a later outcome of the same (model, tier) replaces an earlier unfinished one."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                doc = json.loads(line)
                key = (doc["name"], doc["tier"])
                if key not in merged or merged[key].get("unfinished") or not doc.get("unfinished"):
                    merged[key] = doc
    return list(merged.values())


# ------------------------------------------------------------------------------------------------ the table


def _pass_ok(sweep: Any, tier: str, p: dict[str, Any], dtype: str = "float64") -> bool:
    """The verdict on one pass (for numbers: fxrewrite verified it and the outputs match; export is its own column)."""
    import torch
    if p.get("error") and not (tier == "numbers" and p.get("exported") is False):
        return False
    if tier == "structure":
        return bool(p["plan_agrees"] and p["shapes_ok"])
    outcome = sweep.PassOutcome(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items()})
    return bool(sweep.numbers_ok(dataclasses.replace(outcome, error=None), getattr(torch, dtype)))


def _model_row(sweep: Any, name: str, docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    entry = sweep.BY_NAME[name]
    s, n = docs.get("structure"), docs.get("numbers")
    row: dict[str, Any] = {"name": name, "kind": entry.kind, "family": entry.family, "size": entry.size}
    row["traced"] = bool(s and s.get("traced")) or bool(n and n.get("traced"))
    row["sites"] = (s or n or {}).get("sites", 0)
    structure = {p["kind"]: p for p in (s or {}).get("passes", [])}
    numbers = {p["kind"]: p for p in (n or {}).get("passes", [])}
    row["rewritten"] = {k: (structure.get(k) or numbers.get(k) or {}).get("rewritten") for k in sweep.PASSES}
    row["structure_ok"] = bool(s) and not s.get("error") and len(structure) == len(sweep.PASSES) and all(
        _pass_ok(sweep, "structure", p) for p in structure.values())
    expected = {k: sweep.EXPECTED_NUMERIC_FAILURES.get((name, k)) for k in sweep.PASSES}
    row["numbers_run"] = bool(n) and not n.get("unfinished")
    dtype = (n or {}).get("extra", {}).get("dtype", "float64")
    row["numbers"] = {k: (_pass_ok(sweep, "numbers", p, dtype) if p else None) for k, p in
                      ((k, numbers.get(k)) for k in sweep.PASSES)}
    row["verified"] = row["numbers_run"] and not n.get("error") and all(
        ok or expected[k] is not None for k, ok in row["numbers"].items())
    row["exported"] = row["numbers_run"] and not n.get("error") and all(
        numbers.get(k, {}).get("exported") for k in sweep.PASSES)
    errors = [f"structure: {s['error']}"] if s and s.get("error") else []
    errors += [f"structure {k}: {p['error']}" for k, p in structure.items() if p.get("error")]
    if n and n.get("error") and not n.get("unfinished"):
        errors.append(f"numbers: {n['error']}")
    for k, p in numbers.items():
        if p.get("error"):
            errors.append(f"{k}: {p['error']}")
        elif not _pass_ok(sweep, "numbers", p, dtype) and expected[k] is None:
            errors.append(f"{k}: {p.get('verification', '')} (max rel. error {p.get('max_rel_error')})")
    row["errors"] = errors
    row["expected"] = [f"{k}: {why}" for k, why in expected.items() if why]
    row["seconds"] = sum(d.get("seconds", 0.0) for d in docs.values())
    row["environments"] = {tier: d.get("environment", {}) for tier, d in docs.items()}
    return row


def _fmt_rewritten(counts: dict[str, int | None]) -> str:
    return " / ".join("?" if v is None else str(v) for v in counts.values())


def markdown(docs: list[dict[str, Any]]) -> str:
    sweep = _sweep_module()
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_model.setdefault(doc["name"], {})[doc["tier"]] = doc
    names = [e.name for e in sweep.ZOO]
    rows = [_model_row(sweep, name, by_model.get(name, {})) for name in names]
    families: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault((row["kind"], row["family"]), []).append(row)
    environments = sorted({json.dumps(env, sort_keys=True) for row in rows for env in row["environments"].values()})
    pass_names = " / ".join(sweep.PASSES)
    dtypes = sorted({d.get("extra", {}).get("dtype") for d in docs if d.get("tier") == "numbers" and d.get("extra")})
    numbers_dtype = " and ".join(dtypes) or "float64"
    limits = ", ".join(f"{sweep.EXACT_LIMIT[getattr(__import__('torch'), d)]:g} in {d}" for d in dtypes or ["float64"])
    lines = [
        "# Zoo sweep",
        "",
        "Generated by `python -m benchmarks.zoo_sweep_table` from `tests/test_zoo_sweep.py` (where the expected "
        "failures and their reasons live). Every torchvision classification and segmentation model and the backbone of "
        "every detection model, with random weights, rewritten with each pass kind:",
        "",
        *[f"- `{spec}`" for spec in sweep.PASSES.values()],
        "",
        "Columns, counted in models: **tried**; **traced** (torch.fx capture and shape propagation); **rewritten**: "
        "the structure tier ran every pass on the meta device (`init=random`), the plan agreed with the run site by "
        "site, every replacement kept its site's output shape and the model kept its output shapes; **verified**: "
        f"with random weights in {numbers_dtype}, `fxrewrite.rewrite` verified every pass, the exact passes "
        f"(rank=exact) reproduce the original outputs (relative L2 within the test's `EXACT_LIMIT`: {limits}) and "
        "the lossy one (grouped) keeps shapes and finite values (an expected "
        "failure listed below counts as verified); **exported**: every rewritten model went through `torch.export` "
        "and the program computes what the module does. **sites rewritten** sums, over the family, the sites each "
        f"pass rewrote ({pass_names}); the rest were skipped with a reason code (already depthwise, 1x1 kernel, "
        "channels not divisible, ...). CI runs the structure tier on every model and the numbers tier on the subset "
        "named in the test file.",
        "",
        "| kind | family | tried | traced | rewritten | verified | exported | sites rewritten |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for (kind, family), group in families.items():
        total = {k: sum((r["rewritten"].get(k) or 0) for r in group) for k in sweep.PASSES}
        lines.append(f"| {kind} | {family} | {len(group)} | {sum(r['traced'] for r in group)} | "
                     f"{sum(r['structure_ok'] for r in group)} | "
                     f"{_count(group, 'verified')} | {_count(group, 'exported')} | {_fmt_rewritten(total)} |")
    all_rows = rows
    lines.append(f"| **all** | | **{len(all_rows)}** | **{sum(r['traced'] for r in all_rows)}** | "
                 f"**{sum(r['structure_ok'] for r in all_rows)}** | **{_count(all_rows, 'verified')}** | "
                 f"**{_count(all_rows, 'exported')}** | |")
    not_run = [r["name"] for r in rows if not r["numbers_run"]]
    if not_run:
        lines += ["", "`x of y run`: x of the y models the numbers tier ran; the others are listed under *Not run in "
                  "the numbers tier*."]
    grouped: dict[str, dict[str, list[str]]] = {}  # reason -> pass kinds -> models
    for (name, kind), why in sweep.EXPECTED_NUMERIC_FAILURES.items():
        grouped.setdefault(why, {}).setdefault(kind, []).append(name)
    lines += ["", "## Expected failures", ""]
    for why, kinds in grouped.items():
        models = sorted({n for names_ in kinds.values() for n in names_})
        lines.append(f"- {' and '.join(kinds)} on {', '.join(f'`{n}`' for n in models)}: {why}")
    lines += [f"- structure of `{name}`: {why}" for name, why in sweep.EXPECTED_STRUCTURE_FAILURES.items()]
    if not grouped and not sweep.EXPECTED_STRUCTURE_FAILURES:
        lines.append("- none")
    failures = [(r["name"], e) for r in rows for e in r["errors"]]
    lines += ["", "## Other failures", ""]
    lines += [f"- `{name}`: {text}" for name, text in failures] or ["- none"]
    if not_run:
        reasons = {d["name"]: d.get("error", "") for d in docs if d.get("tier") == "numbers" and d.get("unfinished")}
        lines += ["", "## Not run in the numbers tier", ""]
        lines += [f"- `{n}`: {reasons.get(n) or 'not run'}" for n in not_run]
    lines += ["", "## Per model", "",
              f"| model | kind | input | sites | rewritten ({pass_names}) | structure | verified | exported | s |",
              "|---|---|---:|---:|---|:-:|:-:|:-:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kind']} | {r['size']} | {r['sites']} | {_fmt_rewritten(r['rewritten'])} | "
                     f"{_mark(r['structure_ok'])} | {_mark(r['verified'] if r['numbers_run'] else None)} | "
                     f"{_mark(r['exported'] if r['numbers_run'] else None)} | {r['seconds']:.0f} |")
    lines += ["", "Environments: " + "; ".join(f"`{e}`" for e in environments), ""]
    return "\n".join(lines)


def _count(group: list[dict[str, Any]], key: str) -> str:
    run_ = [r for r in group if r["numbers_run"]]
    ok = sum(bool(r[key]) for r in run_)
    return str(ok) if len(run_) == len(group) else f"{ok} of {len(run_)} run"


def _mark(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tier", choices=["structure", "numbers", "both"], default="both")
    parser.add_argument("--device", default="cpu", help="device of the numbers tier (cpu, cuda)")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="of the numbers tier")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no result is waited for")
    parser.add_argument("--only", nargs="*", default=None, help="these models only")
    parser.add_argument("--largest-first", action=argparse.BooleanOptionalAction, default=None,
                        help="numbers tier order (default: largest first with several jobs, smallest first alone)")
    parser.add_argument("--max-params", type=float, default=None,
                        help="do not run the numbers tier on models with more parameters than this")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSONL file the outcomes are appended to")
    parser.add_argument("--markdown", type=Path, default=DOCS)
    parser.add_argument("--from-json", nargs="*", type=Path, default=None,
                        help="build the table from these JSONL files instead of running")
    args = parser.parse_args(argv)
    sweep = _sweep_module()
    if args.from_json:
        docs = load(args.from_json)
    else:
        names = args.only or [e.name for e in sweep.ZOO]
        unknown = [n for n in names if n not in sweep.BY_NAME]
        if unknown:
            parser.error(f"unknown models: {unknown}")
        tiers = ["structure", "numbers"] if args.tier == "both" else [args.tier]
        docs = run(names, tiers, args.device, args.dtype, args.jobs, args.deadline, args.results, args.max_params,
                   args.largest_first)
        docs = load([args.results]) if args.results.exists() else docs
    text = markdown(docs)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.markdown.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.markdown)
    print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
