"""The budget ILP (LQ-LoRA §3.1, eq. 4): one candidate per matrix, least total error, bytes ≤ budget.

    minimise   Σ_i Σ_c err_ic x_ic
    subject to Σ_c x_ic = 1                 for every matrix i
               Σ_i Σ_c bytes_ic x_ic ≤ B    (B = budget − bytes of everything not planned)
               Σ_i Σ_c cost_ic x_ic ≤ T     (optional: T = per-token decode time, :mod:`.decode_cost`)
               x_ic ∈ {0, 1}

Solved exactly by HiGHS through :func:`scipy.optimize.milp`.  Candidates dominated by another of
the same matrix (no fewer bytes and no less error) can never be optimal and are dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import BudgetInfeasible


@dataclass
class MatrixOptions:
    """The candidates of one matrix: parallel lists of labels, exact bytes and errors."""

    name: str
    labels: list[str]
    bytes: list[int]
    errors: list[float]
    costs: list[float] | None = None  # per-token decode cost (µs), when the plan bounds it


def pareto_front(bytes_: list[int], errors: list[float]) -> list[int]:
    """Indices of the non-dominated candidates, sorted by bytes (ties: smaller error first)."""
    order = sorted(range(len(bytes_)), key=lambda c: (bytes_[c], errors[c], c))
    keep, best_err = [], float("inf")
    for c in order:
        if errors[c] < best_err:
            keep.append(c)
            best_err = errors[c]
    return keep


def pareto_front_3(bytes_: list[int], errors: list[float], costs: list[float]) -> list[int]:
    """Indices not dominated in (bytes, error, cost) — no other candidate is at most as large in
    all three and smaller in one; sorted by bytes.  With a decode-cost bound a larger but faster
    candidate can be optimal, so :func:`pareto_front` would drop too much."""
    pts = [(bytes_[c], errors[c], costs[c]) for c in range(len(bytes_))]
    keep = []
    for c, a in enumerate(pts):
        dominated = any(all(x <= y for x, y in zip(b, a)) and b != a for b in pts)
        duplicate = any(pts[d] == a for d in range(c))
        if not dominated and not duplicate:
            keep.append(c)
    return sorted(keep, key=lambda c: (bytes_[c], errors[c], c))


def min_bytes(options: list[MatrixOptions]) -> int:
    return sum(min(o.bytes) for o in options)


def solve_allocation(options: list[MatrixOptions], budget_bytes: int,
                     time_limit: float = 60.0, max_cost: float | None = None) -> list[int]:
    """Index of the chosen candidate for each matrix.  Raises :class:`BudgetInfeasible`
    (with the smallest feasible byte count in ``.min_bytes``) when nothing fits.  ``max_cost``
    bounds Σ ``costs`` of the chosen candidates (every option must then carry ``costs``)."""
    floor = min_bytes(options)
    if floor > budget_bytes:
        err = BudgetInfeasible(f"budget of {budget_bytes} bytes is below the smallest feasible plan ({floor} bytes)")
        err.min_bytes = floor
        raise err
    if max_cost is not None:
        if any(o.costs is None for o in options):
            raise ValueError("a decode-cost bound needs every matrix's candidate costs")
        fastest = sum(min(o.costs) for o in options)
        if fastest > max_cost:
            err = BudgetInfeasible(f"decode cost bound {max_cost:.1f} is below the fastest plan's ({fastest:.1f})")
            err.min_bytes, err.min_cost = floor, fastest
            raise err
        fronts = [pareto_front_3(o.bytes, o.errors, o.costs) for o in options]
        best = [min(f, key=lambda c, o=o: (o.errors[c], o.bytes[c])) for o, f in zip(options, fronts)]
        if (sum(o.bytes[c] for o, c in zip(options, best)) <= budget_bytes
                and sum(o.costs[c] for o, c in zip(options, best)) <= max_cost):
            return best
    else:
        fronts = [pareto_front(o.bytes, o.errors) for o in options]
        # Nothing to trade off when every matrix can take its most accurate candidate.
        if sum(o.bytes[f[-1]] for o, f in zip(options, fronts)) <= budget_bytes:
            return [f[-1] for f in fronts]
    cost, size, rows, speed = [], [], [], []
    for i, (o, f) in enumerate(zip(options, fronts)):
        for c in f:
            cost.append(o.errors[c])
            size.append(o.bytes[c])
            rows.append(i)
            if max_cost is not None:
                speed.append(o.costs[c])
    cost = np.asarray(cost, dtype=np.float64)
    scale = cost.max() if cost.max() > 0 else 1.0
    n_var = len(cost)
    one_per_matrix = np.zeros((len(options), n_var))
    one_per_matrix[rows, np.arange(n_var)] = 1.0
    constraints = [
        LinearConstraint(one_per_matrix, 1.0, 1.0),
        LinearConstraint(np.asarray(size, dtype=np.float64)[None, :], -np.inf, float(budget_bytes)),
    ]
    if max_cost is not None:
        constraints.append(LinearConstraint(np.asarray(speed, dtype=np.float64)[None, :], -np.inf, float(max_cost)))
    res = milp(cost / scale, constraints=constraints, integrality=np.ones(n_var),
               bounds=Bounds(0, 1), options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if res.x is None:  # bytes and cost are each feasible alone, but not together
        err = BudgetInfeasible(f"no plan fits both {budget_bytes} bytes and the decode cost bound ({res.message})")
        err.min_bytes = floor
        raise err
    x = np.round(res.x).astype(int)
    choice, start = [], 0
    for f in fronts:
        picked = [j for j in range(len(f)) if x[start + j] == 1]
        choice.append(f[picked[0]])
        start += len(f)
    return choice

