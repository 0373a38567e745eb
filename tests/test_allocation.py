import dataclasses
import itertools
import math

import numpy as np

import pytest
from hypothesis import given, settings, strategies as st

from ray_scout.core.allocation import (
    AllocationError, Demand, _optimal_choice, _Problem, allocate, demand_for,
)
from ray_scout.core.modes import Mode
from ray_scout.core.policy import PAPER_B_PAYLOAD_BYTES, paper_b_latency, paper_b_profile

MBIT = 1e6
CLOUD = [Mode.BF16, Mode.INT8, Mode.INT4, Mode.MIXED_INT4, Mode.SCOUT]
STRATEGIES = ["equal", "model_aware", "greedy", "quality_max", "optimal"]


def kv_agent(agent_id, int8_bytes, deadline_s=1.5, fixed_s=0.5):
    """An agent that can only send INT8 KV (Paper B's allocation example has no scout)."""
    return Demand(agent_id, {Mode.INT8: int8_bytes}, {Mode.INT8: 1.0}, deadline_s,
                  {Mode.INT8: fixed_s}, kv_size_bytes=int8_bytes)


def four_agents_on_50_mbit():
    # Two 7B-class and two 14B-class edges (KV 3.4x larger): INT8 payloads needing
    # 4.8 and 16.8 Mbit/s to make a 1.5 s deadline with 0.5 s of compute: 43.2 Mbit/s in all.
    return [kv_agent("small-1", 600_000), kv_agent("small-2", 600_000),
            kv_agent("large-1", 2_100_000), kv_agent("large-2", 2_100_000)]


def hits(alloc, demands):
    return sum(alloc.mode[d.agent_id] != Mode.LOCAL for d in demands)


def test_equal_split_misses_the_large_models_and_model_aware_meets_every_deadline():
    demands = four_agents_on_50_mbit()
    equal = allocate("equal", demands, 50 * MBIT)
    aware = allocate("model_aware", demands, 50 * MBIT)
    assert all(r == pytest.approx(12.5 * MBIT) for r in equal.rate_bps.values())
    assert equal.mode["large-1"] == equal.mode["large-2"] == Mode.LOCAL
    assert hits(equal, demands) == 2
    assert hits(aware, demands) == 4
    assert aware.rate_bps["large-1"] == pytest.approx(50 * MBIT * 2.1 / 5.4)


@pytest.mark.parametrize("strategy", ["greedy", "quality_max", "optimal"])
def test_quality_seeking_strategies_also_meet_every_deadline_in_the_example(strategy):
    demands = four_agents_on_50_mbit()
    alloc = allocate(strategy, demands, 50 * MBIT)
    assert hits(alloc, demands) == 4 and alloc.objective == pytest.approx(4.0)
    assert sum(alloc.rate_bps.values()) == pytest.approx(50 * MBIT)


def test_leftover_goes_in_proportion_to_planned_bytes():
    demands = four_agents_on_50_mbit()
    alloc = allocate("optimal", demands, 50 * MBIT)
    required = {d.agent_id: d.required_rate_bps(Mode.INT8) for d in demands}
    extra = {a: alloc.rate_bps[a] - required[a] for a in required}
    assert extra["large-1"] / extra["small-1"] == pytest.approx(3.5)


def test_with_scout_available_the_squeezed_agents_plan_scout_instead_of_missing():
    demands = [Demand(f"a{i}", {Mode.INT8: 2_100_000, Mode.SCOUT: 336},
                      {Mode.INT8: 0.996, Mode.SCOUT: 0.81}, 1.5,
                      {Mode.INT8: 0.5, Mode.SCOUT: 0.557}) for i in range(4)]
    alloc = allocate("optimal", demands, 50 * MBIT)
    modes = sorted(m.value for m in alloc.mode.values())
    assert modes == ["int8", "int8", "scout", "scout"]  # two fit at 16.8 Mbit/s each


def test_a_deadline_shorter_than_the_fixed_latency_makes_a_mode_unavailable():
    d = Demand("a", {Mode.INT8: 1000}, {Mode.INT8: 1.0}, 0.4, {Mode.INT8: 0.5})
    assert math.isinf(d.required_rate_bps(Mode.INT8))
    assert allocate("optimal", [d], 1e9).mode["a"] == Mode.LOCAL


def test_known_local_quality_is_the_floor_when_the_edge_answers_in_time():
    d = Demand("a", {Mode.INT8: 10_000_000}, {Mode.INT8: 1.0, Mode.LOCAL: 0.4}, 1.0,
               {Mode.INT8: 0.5, Mode.LOCAL: 0.8})
    alloc = allocate("quality_max", [d], 1 * MBIT)
    assert alloc.mode["a"] == Mode.LOCAL and alloc.objective == pytest.approx(0.4)


def test_zero_capacity_plans_only_rate_free_options():
    alloc = allocate("optimal", four_agents_on_50_mbit(), 0.0)
    assert set(alloc.mode.values()) == {Mode.LOCAL} and alloc.objective == 0


def test_bad_input_is_refused_with_what_to_do():
    with pytest.raises(AllocationError, match="known: equal"):
        allocate("fifo", four_agents_on_50_mbit(), 1e6)
    with pytest.raises(AllocationError, match="unique"):
        allocate("equal", [kv_agent("a", 1), kv_agent("a", 1)], 1e6)
    with pytest.raises(AllocationError, match="no demands"):
        allocate("equal", [], 1e6)


# --- random instances -----------------------------------------------------------------
# Rates on the optimal's grid (2000 cells of 5 kbit/s over 10 Mbit/s) make rounding exact,
# so brute force over the real rates is the ground truth for the DP.
GRID_BYTES = 625  # 5 kbit/s over a 1 s budget


@st.composite
def instances(draw, max_agents=4, grid_aligned=False):
    n = draw(st.integers(1, max_agents))
    demands = []
    for i in range(n):
        modes = draw(st.lists(st.sampled_from(CLOUD), min_size=1, max_size=5, unique=True))
        if grid_aligned:
            sizes = {m: GRID_BYTES * draw(st.integers(0, 2500)) for m in modes}
        else:
            sizes = {m: draw(st.integers(0, 3_000_000)) for m in modes}
        quality = {m: draw(st.floats(0, 1.2)) for m in modes}
        demands.append(Demand(f"a{i}", sizes, quality, 1.5, {m: 0.5 for m in modes},
                              weight=draw(st.floats(0.1, 3))))
    return demands


def brute_force(demands, capacity_bps):
    options = [[(0.0, d.weight * d.local_quality())]
               + [(d.required_rate_bps(m), d.weight * q) for m, q in d.quality.items()]
               for d in demands]
    best = 0.0
    for combo in itertools.product(*options):
        if sum(r for r, _ in combo) <= capacity_bps * (1 + 1e-12):
            best = max(best, sum(v for _, v in combo))
    return best


@settings(max_examples=150, deadline=None)
@given(instances(grid_aligned=True))
def test_optimal_matches_brute_force_on_small_instances(demands):
    alloc = allocate("optimal", demands, 10 * MBIT)
    assert alloc.objective == pytest.approx(brute_force(demands, 10 * MBIT), abs=1e-9)
    assert sum(alloc.rate_bps.values()) <= 10 * MBIT * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(instances(max_agents=8), st.floats(0.5 * MBIT, 60 * MBIT))
def test_optimal_beats_quality_max_beats_equal_on_random_instances(demands, capacity_bps):
    objective = {s: allocate(s, demands, capacity_bps).objective for s in STRATEGIES}
    assert objective["optimal"] >= objective["quality_max"] - 1e-9
    assert objective["quality_max"] >= objective["greedy"] - 1e-9
    assert objective["quality_max"] >= objective["equal"] - 1e-9
    if len(demands) <= 4:  # the optimum of the real problem bounds every feasible plan
        assert objective["optimal"] <= brute_force(demands, capacity_bps) + 1e-9


@settings(max_examples=100, deadline=None)
@given(instances(max_agents=8), st.floats(0.5 * MBIT, 60 * MBIT),
       st.sampled_from(STRATEGIES))
def test_every_plan_fits_its_rates_and_its_rates_fit_the_capacity(demands, capacity_bps,
                                                                  strategy):
    alloc = allocate(strategy, demands, capacity_bps)
    assert sum(alloc.rate_bps.values()) <= capacity_bps * (1 + 1e-9)
    for d in demands:
        mode = alloc.mode[d.agent_id]
        if mode != Mode.LOCAL:
            assert d.required_rate_bps(mode) <= alloc.rate_bps[d.agent_id] * (1 + 1e-9)


def test_demand_for_takes_fixed_latency_from_the_latency_model_and_quality_from_the_profile():
    d = demand_for("a", PAPER_B_PAYLOAD_BYTES, paper_b_profile("3b-7b"),
                   paper_b_latency(rtt_s=0.02), deadline_s=1.5)
    assert d.fixed_s[Mode.SCOUT] == pytest.approx(0.018 + 0.02 + 0.557)
    assert d.quality[Mode.INT4] == 0.962 and Mode.LOCAL not in d.quality
    assert d.required_rate_bps(Mode.INT8) == pytest.approx(4.7e6 * 8 / (1.5 - 0.542))


@st.composite
def instances_with_twins(draw):
    """Grid-aligned instances where several agents share identical options."""
    templates = draw(instances(max_agents=3, grid_aligned=True))
    copies = [draw(st.integers(1, 3)) for _ in templates]
    return [dataclasses.replace(t, agent_id=f"{t.agent_id}-{k}")
            for t, c in zip(templates, copies) for k in range(c)]


@settings(max_examples=100, deadline=None)
@given(instances_with_twins())
def test_the_exact_dp_alone_matches_brute_force_with_interchangeable_agents(demands):
    # The DP is checked without the heuristic plans that allocate("optimal") also scores.
    problem = _Problem(demands)
    choice = _optimal_choice(problem, 10 * MBIT, grid_cells=2000)
    rows = np.arange(len(demands))
    assert problem.rate[rows, choice].sum() <= 10 * MBIT * (1 + 1e-9)
    assert problem.value[rows, choice].sum() == pytest.approx(
        brute_force(demands, 10 * MBIT), abs=1e-9)
