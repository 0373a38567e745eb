"""Where ``optimal``'s time goes at 1,000 agents under ``expected_hits``, phase by phase.

For each population of ``bench/allocator_speed.py`` and capacity (0.1, 1, 10 Mbit/s per
agent), on a problem already built (a re-split): the greedy on the rounded weights (its
hull is rebuilt at every capacity, since the rounding depends on it), the Lagrangian bound
and the pruning, the grouping into DP units, the whole exact solve (those three and the
DP), and the whole split (the exact solve, the heuristics' plans and the scores; from the
second repeat on, the mode values at those plans' rates are the problem's from the repeat
before, so it is below ``allocator_speed``'s re-split, which computes them); then what the pruning leaves: free agents, their kept
options, the DP's points and cells (its work is at least points x cells updates), the same
with the exact optimum as the lower bound (the best any lower bound could prune), and the
gap between the greedy's value and the Lagrangian upper bound. CPU time of the calling
thread, the minimum of ``--repeats``.

    python3 bench/optimal_phases.py [--repeats 7] [--out bench/results/optimal_phases.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import allocator_speed  # noqa: E402
from ray_scout import provenance  # noqa: E402
from ray_scout.core.control import allocation as A  # noqa: E402


def phases(p, capacity_bps: float, cells: int = A.DEFAULT_GRID_CELLS) -> dict:
    clock = [time.thread_time()]
    w, greedy, lam = A._rounded_greedy(p, capacity_bps, cells)
    clock.append(time.thread_time())
    v, rows = p.value, np.arange(len(p.value))
    lower = float(v[rows, greedy].sum())
    keep, upper = A._kept_options(w, v, greedy, lam, cells, lower)
    free = np.flatnonzero(keep.sum(axis=1) > 1)
    fixed = np.setdiff1d(rows, free)
    left = cells - int(w[fixed, keep[fixed].argmax(axis=1)].sum())
    clock.append(time.thread_time())
    units = A._interchangeable_units(free, keep, w, v, left) if len(free) else []
    clock.append(time.thread_time())
    exact = A._optimal_choice(p, capacity_bps, cells)  # the whole exact solve, timed apart
    clock.append(time.thread_time())
    A._optimal(p, capacity_bps)
    clock.append(time.thread_time())
    optimum = float(v[rows, exact].sum())
    ideal, _ = A._kept_options(w, v, greedy, lam, cells, optimum)
    dt = np.diff(clock) * 1e3
    points = int(sum(len(u[2]) for u in units))
    return {"greedy_rounded_ms": dt[0], "bound_ms": dt[1], "units_ms": dt[2],
            "exact_total_ms": dt[3], "split_total_ms": dt[4], "free_agents": len(free),
            "dp_units": len(units), "dp_points": points, "dp_cells": left,
            "dp_updates": points * (left + 1),
            "free_agents_with_exact_lower_bound": int((ideal.sum(axis=1) > 1).sum()),
            "lower": lower, "optimum": optimum, "upper": upper,
            "greedy_gap_of_upper": (upper - lower) / upper}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench/results/optimal_phases.json"))
    args = parser.parse_args()
    where = provenance.record()
    per_token = allocator_speed.bf16_bytes_per_token()
    rows = []
    for name in ("random", "cell", "identical"):
        demands = allocator_speed.population(name, 1000, per_token)
        problem = A._problem(demands, "expected_hits")
        for per_agent_mbit in (0.1, 1, 10):
            runs = [phases(problem, 1000 * per_agent_mbit * 1e6) for _ in range(args.repeats)]
            row = {k: (min(r[k] for r in runs) if k.endswith("_ms") else runs[0][k])
                   for k in runs[0]}
            rows.append({"population": name, "capacity_per_agent_mbit": per_agent_mbit, **row})
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": where, "argv": sys.argv, "rows": rows,
                                    "load_end": list(__import__("os").getloadavg())},
                                   indent=1))


if __name__ == "__main__":
    main()
