"""The planner: budgets parse, plans fit, greedy is near the exact optimum, infeasible is explained."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from stn_edge.errors import BudgetError
from stn_edge.plan import LadderSpec, parse_budget, plan_ranks


@pytest.mark.parametrize(
    "value, expected",
    [(1234, 1234), ("1234", 1234), ("12MB", 12_000_000), ("12 MiB", 12 * 2**20), ("800kB", 800_000),
     ("1.5GiB", int(1.5 * 2**30)), ("35%", 350), ("100%", 1000), (None, 1000), (2.5e3, 2500)],
)
def test_parse_budget(value, expected):
    assert parse_budget(value, 1000) == expected


@pytest.mark.parametrize("value", ["12 parsecs", "MB", "-5%", "", "0", 0, -3, True, [1]])
def test_bad_budgets_are_refused(value):
    with pytest.raises(BudgetError, match="budget"):
        parse_budget(value, 1000)


def _random_specs(rng: np.random.Generator, n: int, levels: int = 6) -> list[LadderSpec]:
    specs = []
    for i in range(n):
        ranks = tuple(range(1, levels + 1))
        per_rank = int(rng.integers(50, 200))
        dense = per_rank * (levels + 2)
        sv = np.sort(rng.random(levels + 3))[::-1] ** 2
        loss = tuple(float(sv[k:].sum() / sv.sum()) for k in ranks)
        specs.append(LadderSpec(f"l{i}", "svd", ranks, tuple(per_rank * k for k in ranks), loss, dense, levels + 3))
    return specs


def _exact(specs, fixed, budget):
    options = [[(b, l) for b, l in zip(s.bytes, s.loss) if b < s.dense_bytes] + [(s.dense_bytes, 0.0)] for s in specs]
    best = None
    for combo in itertools.product(*options):
        used = fixed + sum(c[0] for c in combo)
        if used <= budget:
            loss = sum(c[1] for c in combo)
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_plan_fits_and_is_near_optimal(seed):
    rng = np.random.default_rng(seed)
    specs = _random_specs(rng, 4)
    full = sum(s.dense_bytes for s in specs) + 100
    for frac in (0.2, 0.35, 0.5, 0.8, 1.0):
        budget = int(full * frac)
        try:
            plan = plan_ranks(specs, 100, budget, full)
        except BudgetError as exc:
            assert exc.smallest_feasible > budget
            continue
        assert plan.total_bytes <= budget
        exact = _exact(specs, 100, budget)
        # greedy on hulls plus the fill pass: within 10% of the optimum loss (plus a tiny absolute slack)
        assert plan.loss <= exact * 1.10 + 1e-3


def test_full_budget_is_all_dense_and_lossless():
    specs = _random_specs(np.random.default_rng(1), 5)
    full = sum(s.dense_bytes for s in specs)
    plan = plan_ranks(specs, 0, full, full)
    assert all(c.dense for c in plan.layers) and plan.loss == 0.0


def test_infeasible_budget_states_smallest_feasible():
    specs = _random_specs(np.random.default_rng(2), 3)
    smallest = 10 + sum(s.bytes[0] for s in specs)
    with pytest.raises(BudgetError, match=f"at least {smallest}") as info:
        plan_ranks(specs, 10, smallest - 1, 10**6)
    assert info.value.smallest_feasible == smallest
    assert plan_ranks(specs, 10, smallest, 10**6).total_bytes == smallest


def test_monotone_more_budget_never_more_loss():
    specs = _random_specs(np.random.default_rng(3), 20, levels=16)
    full = sum(s.dense_bytes for s in specs)
    losses = [plan_ranks(specs, 0, int(full * f), full).loss for f in np.linspace(0.3, 1.0, 15)]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))


def test_plan_table_lists_every_layer():
    specs = _random_specs(np.random.default_rng(4), 3)
    full = sum(s.dense_bytes for s in specs)
    table = plan_ranks(specs, 0, full // 2, full).table()
    for s in specs:
        assert s.name in table
    assert "total" in table and "budget" in table


def test_plan_holds_for_hundreds_of_layers():
    specs = _random_specs(np.random.default_rng(5), 300, levels=32)
    full = sum(s.dense_bytes for s in specs)
    for frac in (0.1, 0.33, 0.7):
        plan = plan_ranks(specs, 0, int(full * frac), full)
        assert plan.total_bytes <= int(full * frac)
        # the greedy leaves less unused budget than the smallest single upgrade step
        assert int(full * frac) - plan.total_bytes < max(s.dense_bytes for s in specs)


def test_uniform_planner_keeps_one_ratio_and_fits():
    from stn_edge.plan import plan_uniform

    specs = _random_specs(np.random.default_rng(6), 6, levels=8)
    full = sum(s.dense_bytes for s in specs)
    plan = plan_uniform(specs, 0, full // 3, full)
    assert plan.total_bytes <= full // 3
    ratios = [c.rank / c.max_rank for c in plan.layers if not c.dense]
    assert max(ratios) - min(ratios) < 0.35  # one ratio, up to the ladders' granularity
    greedy = plan_ranks(specs, 0, full // 3, full)
    assert greedy.loss <= plan.loss + 1e-12  # the loss-aware planner is never worse
