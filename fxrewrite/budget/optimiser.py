"""The budget's optimiser: a multiple-choice knapsack that picks one candidate per site (index 0: keep the conv) so
that the summed costs (MACs, parameters and optionally latency) stay within their budgets with the least summed loss.

``greedy`` walks every site's lower convex hull of (cost, loss) by least loss added per unit of cost saved until
every budget holds, then repairs (spends the remaining slack on the single change that lowers the loss most, while it
fits); ``dp`` is dynamic programming over sites with costs rounded *up* to ``budget / buckets`` units (one binding
constraint), then the same repair; ``auto`` runs both and keeps the better plan. See ``fxrewrite.budget.choose`` for
how ``choose_plan`` sets the problem up.

>>> optimise([[10, 6, 2]], [[0, 0, 0]], [[0.0, 0.1, 0.9]], macs_budget=6)  # the cheapest option that fits
[1]
>>> optimise([[10, 6, 2]], [[0, 0, 0]], [[0.0, 0.1, 0.9]], macs_budget=1) is None  # nothing fits
True
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fxrewrite.errors import ConfigError

__all__ = ["METHODS", "optimise"]

METHODS = ("auto", "greedy", "dp")
_EPS = 1e-12
_ZERO = 1e-12  # weighted losses below this are float rounding, not loss


@dataclass(frozen=True)
class _Problem:
    """Per constraint and site: candidate costs; per site: weighted losses; index 0 is always "keep" (zero loss).
    The constraints are MACs, params and (latency targets) latency, each with its budget for the sites together
    (inf: no constraint)."""

    costs: tuple[tuple[np.ndarray, ...], ...]  # costs[c][s]
    errors: tuple[np.ndarray, ...]  # w_s * loss(e_s)
    budgets: tuple[float, ...]

    def totals(self, choice: Sequence[int]) -> tuple[list[float], float]:
        costs = [sum(float(cost[s][j]) for s, j in enumerate(choice)) for cost in self.costs]
        return costs, sum(float(self.errors[s][j]) for s, j in enumerate(choice))

    def feasible(self, choice: Sequence[int]) -> bool:
        costs, _ = self.totals(choice)
        return all(c <= b for c, b in zip(costs, self.budgets, strict=True))


def _hull(cost: np.ndarray, err: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, err) from candidate 0 (keep) towards the cheapest candidate."""
    keep_cost = cost[0]
    idx = [j for j in range(len(cost)) if cost[j] < keep_cost]
    idx.sort(key=lambda j: (cost[j], err[j]))
    chain: list[int] = []
    for j in [*idx, 0]:  # monotone chain, left to right, ending at keep (the lowest error)
        while len(chain) >= 2:
            a, b = chain[-2], chain[-1]
            cross = (cost[b] - cost[a]) * (err[j] - err[a]) - (err[b] - err[a]) * (cost[j] - cost[a])
            if cross <= 0:
                chain.pop()
            else:
                break
        if chain and cost[chain[-1]] == cost[j]:
            if err[j] < err[chain[-1]]:
                chain[-1] = j
            continue
        chain.append(j)
    return chain[::-1]  # keep first


def _greedy(p: _Problem, scales: Sequence[float]) -> list[int] | None:
    """Walk every site's hull of the scalar cost ``sum_c scales[c] * cost_c`` by least error per cost saved until
    every constraint holds."""
    n = len(p.errors)
    scalar = [sum(a * p.costs[c][s] for c, a in enumerate(scales) if a) for s in range(n)]
    hulls = [_hull(scalar[s], p.errors[s]) for s in range(n)]
    pos = [0] * n
    choice = [0] * n
    tot = [sum(float(cost[s][0]) for s in range(n)) for cost in p.costs]
    heap: list[tuple[float, int]] = []

    def push(s: int) -> None:
        h, t = hulls[s], pos[s]
        if t + 1 < len(h):
            cur, nxt = h[t], h[t + 1]
            saved = scalar[s][cur] - scalar[s][nxt]
            heapq.heappush(heap, ((p.errors[s][nxt] - p.errors[s][cur]) / max(saved, _EPS), s))

    for s in range(n):
        push(s)
    while any(t > b for t, b in zip(tot, p.budgets, strict=True)):
        if not heap:
            return None
        _, s = heapq.heappop(heap)
        old, new = hulls[s][pos[s]], hulls[s][pos[s] + 1]
        for c, cost in enumerate(p.costs):
            tot[c] += float(cost[s][new] - cost[s][old])
        pos[s] += 1
        choice[s] = new
        push(s)
    return choice


def _padded(arrays: Sequence[np.ndarray], fill: float) -> np.ndarray:
    width = max(len(x) for x in arrays)
    out = np.full((len(arrays), width), fill, dtype=np.float64)
    for s, x in enumerate(arrays):
        out[s, :len(x)] = x
    return out


def _repair(p: _Problem, choice: list[int]) -> list[int]:
    """Spend the slack: repeatedly apply the single-site change that lowers the error most and still fits."""
    if not choice:
        return choice
    costs = [_padded(c, np.inf) for c in p.costs]
    errors = _padded(p.errors, np.inf)
    rows = np.arange(len(choice))
    cur = np.array(choice)
    while True:
        # first, each site to its cheapest candidate (by MACs, then params, then latency) no worse in error and cost
        mask = errors <= errors[rows, cur][:, None]
        for c in costs:
            mask &= c <= c[rows, cur][:, None]
        for c in costs:
            mask &= c == np.where(mask, c, np.inf).min(axis=1, keepdims=True)
        cur = np.argmax(mask, axis=1)
        gain = errors[rows, cur][:, None] - errors
        ok = gain > _EPS
        for c, budget in zip(costs, p.budgets, strict=True):
            ok &= c[rows, cur].sum() + (c - c[rows, cur][:, None]) <= budget
        if not ok.any():
            return [int(j) for j in cur]
        score = np.where(ok, gain, -np.inf)
        s, j = np.unravel_index(int(np.argmax(score)), score.shape)
        cur[s] = j


def _dp(p: _Problem, buckets: int, constraint: int) -> list[int] | None:
    """Multiple-choice knapsack by DP on one constraint, costs rounded up to ``budget / buckets`` units."""
    costs = p.costs[constraint]
    budget = p.budgets[constraint]
    if budget < 0:
        return None
    integral = all(np.all(c == np.floor(c)) and np.all(np.abs(c) < 2**62) for c in costs)
    unit = max(budget / buckets, _EPS)
    if integral:  # integer costs: the common divisor of all costs is an exact unit when it is coarse enough
        step = float(np.gcd.reduce(np.concatenate([c.astype(np.int64) for c in costs])) or 1)
        unit = step if budget / step <= buckets else max(unit, step)
    size = math.floor(budget / unit)
    f = np.full(size + 1, np.inf)
    f[0] = 0.0
    picks = []
    for c, e in zip(costs, p.errors, strict=True):
        q = np.ceil(c / unit - 1e-9).astype(np.int64)
        g = np.full(size + 1, np.inf)
        arg = np.zeros(size + 1, dtype=np.int32)
        for j in np.argsort(e):
            if q[j] > size:
                continue
            shifted = f[:size + 1 - q[j]] + e[j]
            better = shifted < g[q[j]:]
            g[q[j]:][better] = shifted[better]
            arg[q[j]:][better] = j
        f = g
        picks.append(arg)
    if not np.isfinite(f).any():
        return None
    b = int(np.argmin(f))
    choice = [0] * len(costs)
    for s in range(len(costs) - 1, -1, -1):
        j = int(picks[s][b])
        choice[s] = j
        b -= int(np.ceil(costs[s][j] / unit - 1e-9))
    return choice


def _scales(binding: Sequence[int], need: Sequence[float], n: int) -> list[list[float]]:
    """Greedy scalarisations: the binding constraint alone, or points inside the simplex of the binding ones, each
    normalised by how much that constraint must save."""
    points: list[tuple[float, ...]]
    if len(binding) == 1:
        points = [(1.0,)]
    elif len(binding) == 2:
        points = [(t, 1.0 - t) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    else:
        points = [(a / 6, b / 6, (6 - a - b) / 6) for a in range(1, 5) for b in range(1, 6 - a)]
    out = []
    for pt in points:
        row = [0.0] * n
        for c, w in zip(binding, pt, strict=True):
            row[c] = w / need[c]
        out.append(row)
    return out


def optimise(macs: Sequence[Sequence[float]], params: Sequence[Sequence[float]], errors: Sequence[Sequence[float]],
             macs_budget: float = math.inf, params_budget: float = math.inf, *,
             latency: Sequence[Sequence[float]] | None = None, latency_budget: float = math.inf,
             method: str = "auto", buckets: int | None = None) -> list[int] | None:
    """The multiple-choice knapsack on its own: per site, candidate costs (MACs, params and optionally latency)
    and (weighted) losses with candidate 0 the zero-error "keep"; returns the chosen index per site with every sum
    within its budget and the least total error found, or None when none is feasible.

    >>> optimise([[4, 2, 1], [4, 3, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 3], [0, 0.5, 4]], macs_budget=5)
    [1, 1]
    >>> optimise([[4, 2, 1], [4, 3, 1]], [[0, 0, 0], [0, 0, 0]], [[0, 1, 3], [0, 0.5, 4]],
    ...          latency=[[3.0, 2.5, 1.0], [3.0, 1.0, 0.5]], latency_budget=4.0)
    [0, 1]
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    tables = [macs, params] + ([latency] if latency is not None else [])
    budgets = [macs_budget, params_budget] + ([latency_budget] if latency is not None else [])
    zeroed = (np.asarray(x, dtype=np.float64) for x in errors)
    p = _Problem(tuple(tuple(np.asarray(x, dtype=np.float64) for x in t) for t in tables),
                 tuple(np.where(x < _ZERO, 0.0, x) for x in zeroed), tuple(float(b) for b in budgets))
    n = len(p.errors)
    if n == 0:
        return [] if p.feasible([]) else None
    found: list[list[int]] = []
    need = [sum(float(x[0]) for x in cost) - budget for cost, budget in zip(p.costs, p.budgets, strict=True)]
    binding = [c for c, v in enumerate(need) if v > 0]
    if not binding:
        return [0] * n  # keeping everything fits
    one = len(binding) == 1
    if method == "dp" and not one:
        raise ConfigError("method='dp' handles one binding constraint (macs, params or latency); use 'greedy' or "
                          "'auto' when several bind")
    if method in ("auto", "greedy"):
        for scales in _scales(binding, need, len(p.costs)):
            choice = _greedy(p, scales)
            if choice is not None:
                found.append(_repair(p, choice))
    if one and method in ("auto", "dp"):
        if buckets is None:
            work = sum(len(x) for x in p.errors)
            buckets = int(min(1 << 16, max(1 << 12, 4e7 // max(work, 1))))
        choice = _dp(p, buckets, binding[0])
        if choice is not None and p.feasible(choice):
            found.append(_repair(p, choice))
    found = [c for c in found if p.feasible(c)]
    if not found:
        return None
    return min(found, key=lambda c: p.totals(c)[1])
