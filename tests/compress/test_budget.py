"""The budget ILP equals brute force on tiny instances and never exceeds the budget."""

import itertools

import numpy as np
import pytest

from quantseal.compress.budget import MatrixOptions, pareto_front, solve_allocation
from quantseal.errors import BudgetInfeasible


def brute_force(options, budget):
    best = (float("inf"), None)
    for combo in itertools.product(*[range(len(o.bytes)) for o in options]):
        if sum(o.bytes[c] for o, c in zip(options, combo)) <= budget:
            err = sum(o.errors[c] for o, c in zip(options, combo))
            if err < best[0]:
                best = (err, combo)
    return best


def random_instance(rng, n_mat, n_cand):
    opts = []
    for i in range(n_mat):
        b = rng.integers(10, 200, n_cand).tolist()
        # more bytes tends to mean less error, with noise (dominated candidates included)
        e = (1000.0 / np.asarray(b) * rng.uniform(0.5, 1.5, n_cand)).tolist()
        opts.append(MatrixOptions(f"m{i}", [f"c{j}" for j in range(n_cand)], b, e))
    return opts


@pytest.mark.parametrize("seed", range(25))
def test_ilp_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    opts = random_instance(rng, n_mat=int(rng.integers(2, 5)), n_cand=int(rng.integers(2, 6)))
    lo = sum(min(o.bytes) for o in opts)
    hi = sum(max(o.bytes) for o in opts)
    budget = int(rng.integers(lo, hi + 1))
    choice = solve_allocation(opts, budget)
    used = sum(o.bytes[c] for o, c in zip(opts, choice))
    err = sum(o.errors[c] for o, c in zip(opts, choice))
    assert used <= budget
    assert err == pytest.approx(brute_force(opts, budget)[0], rel=1e-9)


def test_infeasible_names_minimum():
    opts = [MatrixOptions("a", ["x", "y"], [10, 20], [2.0, 1.0]), MatrixOptions("b", ["x"], [7], [0.5])]
    with pytest.raises(BudgetInfeasible) as exc:
        solve_allocation(opts, 16)
    assert exc.value.min_bytes == 17
    assert solve_allocation(opts, 17) == [0, 0]
    assert solve_allocation(opts, 1000) == [1, 0]


def test_pareto_front_drops_dominated():
    # (bytes, error): (10, 5) (12, 6)x (15, 3) (15, 4)x (20, 3)x (30, 1)
    keep = pareto_front([10, 12, 15, 15, 20, 30], [5, 6, 3, 4, 3, 1])
    assert keep == [0, 2, 5]
