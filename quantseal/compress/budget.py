"""The budget ILP (LQ-LoRA §3.1, eq. 4): one candidate per matrix, least total error, bytes ≤ budget.

    minimise   Σ_i Σ_c err_ic x_ic
    subject to Σ_c x_ic = 1                 for every matrix i
               Σ_i Σ_c bytes_ic x_ic ≤ B    (B = budget − bytes of everything not planned)
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


def pareto_front(bytes_: list[int], errors: list[float]) -> list[int]:
    """Indices of the non-dominated candidates, sorted by bytes (ties: smaller error first)."""
    order = sorted(range(len(bytes_)), key=lambda c: (bytes_[c], errors[c], c))
    keep, best_err = [], float("inf")
    for c in order:
        if errors[c] < best_err:
            keep.append(c)
            best_err = errors[c]
    return keep


def min_bytes(options: list[MatrixOptions]) -> int:
    return sum(min(o.bytes) for o in options)


def solve_allocation(options: list[MatrixOptions], budget_bytes: int,
                     time_limit: float = 60.0) -> list[int]:
    """Index of the chosen candidate for each matrix.  Raises :class:`BudgetInfeasible`
    (with the smallest feasible byte count in ``.min_bytes``) when nothing fits."""
    floor = min_bytes(options)
    if floor > budget_bytes:
        err = BudgetInfeasible(f"budget of {budget_bytes} bytes is below the smallest feasible plan ({floor} bytes)")
        err.min_bytes = floor
        raise err
    fronts = [pareto_front(o.bytes, o.errors) for o in options]
    # Nothing to trade off when every matrix can take its most accurate candidate.
    if sum(o.bytes[f[-1]] for o, f in zip(options, fronts)) <= budget_bytes:
        return [f[-1] for f in fronts]

    cost, size, rows = [], [], []
    for i, (o, f) in enumerate(zip(options, fronts)):
        for c in f:
            cost.append(o.errors[c])
            size.append(o.bytes[c])
            rows.append(i)
    cost = np.asarray(cost, dtype=np.float64)
    scale = cost.max() if cost.max() > 0 else 1.0
    n_var = len(cost)
    one_per_matrix = np.zeros((len(options), n_var))
    one_per_matrix[rows, np.arange(n_var)] = 1.0
    constraints = [
        LinearConstraint(one_per_matrix, 1.0, 1.0),
        LinearConstraint(np.asarray(size, dtype=np.float64)[None, :], -np.inf, float(budget_bytes)),
    ]
    res = milp(cost / scale, constraints=constraints, integrality=np.ones(n_var),
               bounds=Bounds(0, 1), options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if res.x is None:  # pragma: no cover - feasibility was checked above
        raise BudgetInfeasible(f"the ILP found no plan within {budget_bytes} bytes ({res.message})")
    x = np.round(res.x).astype(int)
    choice, start = [], 0
    for f in fronts:
        picked = [j for j in range(len(f)) if x[start + j] == 1]
        choice.append(f[picked[0]])
        start += len(f)
    return choice

