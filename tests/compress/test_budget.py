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


def brute_force_with_cost(options, budget, max_cost):
    best = (float("inf"), None)
    for combo in itertools.product(*[range(len(o.bytes)) for o in options]):
        if (sum(o.bytes[c] for o, c in zip(options, combo)) <= budget
                and sum(o.costs[c] for o, c in zip(options, combo)) <= max_cost):
            err = sum(o.errors[c] for o, c in zip(options, combo))
            if err < best[0]:
                best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_ilp_with_a_decode_cost_bound_equals_brute_force(seed):
    """Both knapsack rows hold, and the optimum is brute force's (so the 3-D Pareto pruning drops
    no candidate that a cost bound could make optimal: a large, fast one included)."""
    rng = np.random.default_rng(100 + seed)
    opts = random_instance(rng, n_mat=int(rng.integers(2, 5)), n_cand=int(rng.integers(2, 6)))
    for o in opts:  # cost unrelated to bytes: a big candidate may be the fast one (fp vs nf4)
        o.costs = rng.uniform(1, 50, len(o.bytes)).tolist()
    budget = int(rng.integers(sum(min(o.bytes) for o in opts), sum(max(o.bytes) for o in opts) + 1))
    max_cost = float(rng.uniform(sum(min(o.costs) for o in opts), sum(max(o.costs) for o in opts)))
    ref_err, _ = brute_force_with_cost(opts, budget, max_cost)
    if ref_err == float("inf"):
        with pytest.raises(BudgetInfeasible):
            solve_allocation(opts, budget, max_cost=max_cost)
        return
    choice = solve_allocation(opts, budget, max_cost=max_cost)
    assert sum(o.bytes[c] for o, c in zip(opts, choice)) <= budget
    assert sum(o.costs[c] for o, c in zip(opts, choice)) <= max_cost + 1e-9
    assert sum(o.errors[c] for o, c in zip(opts, choice)) == pytest.approx(ref_err, rel=1e-9)


def test_cost_bound_below_the_fastest_plan_is_infeasible():
    opts = [MatrixOptions("a", ["x", "y"], [10, 20], [2.0, 1.0], [5.0, 3.0])]
    with pytest.raises(BudgetInfeasible) as exc:
        solve_allocation(opts, 100, max_cost=2.0)
    assert exc.value.min_cost == 3.0
    assert solve_allocation(opts, 100, max_cost=3.0) == [1]
    assert solve_allocation(opts, 15, max_cost=10.0) == [0]


def test_pareto_front_3_keeps_a_large_fast_candidate():
    from quantseal.compress.budget import pareto_front_3

    # (bytes, error, cost): (10, 5, 9) (20, 5, 1) is kept for its speed; (20, 6, 2) is dominated by it
    assert pareto_front_3([10, 20, 20, 30], [5, 5, 6, 1], [9, 1, 2, 9]) == [0, 1, 3]
