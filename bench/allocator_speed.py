"""How long each allocator takes to decide for many agents (goal: 1,000 agents in 10 ms).

Populations:

- ``random``: agents drawn at random: an edge model among the Qwen2.5 presets (its BF16 KV
  bytes per token from the model config), a context of 256-4096 tokens, payloads per mode
  scaled from BF16 by Paper B's modes table (INT8 4.7/9.7, INT4 2.3/9.7, mixed INT4 2.6/9.7,
  scout 2 B per selected index at 25% retention), quality per mode jittered around Paper
  B's, a deadline of 0.5-3 s, 0.05-0.6 s of fixed latency per mode, Poisson arrivals at
  0.05-0.5 Hz and the adaptive policy's 10% margin. Every agent is a shape of its own.
- ``cell``: the shapes of ``experiments/cell_1000.yaml``'s demands: 40% 3B, 35% 7B, 25% 14B
  KV at its median context (1,024 tokens), Paper B's payload ratios, profile (3b-7b) and
  stage times, 3 s deadline, 0.1 Hz, the 10% margin, and every fourth agent queue-aware
  (``guards_next_arrival``): six shapes for any number of agents.
- ``identical``: Paper B's payloads, profile and stage times at 0.25 Hz, 1.5 s: the worst
  case for ``optimal``'s bound-based reduction (any agent may take the upgrade).

Six options per agent under ``mean_response`` (the five cloud modes and the rate-0 local
fallback); under ``expected_hits`` each cloud mode at every rung of ``HIT_LEVELS``. Timed, in
CPU time of the calling thread (``time.thread_time``: the work alone, the box is shared) and
wall time: ``allocate(strategy, demands, capacity)`` end to end at a capacity of 0.1, 1 and
10 Mbit/s per agent, after one warm-up: a **re-split**, what an allocator pays at each
capacity change (the same demands: ``allocation`` keeps the problem built from them). Apart:
the **first split of new demands** of known shapes (the closed loop rebuilds demands: the
problem is rebuilt, the per-shape values are reused), and of **new shapes** (the hit ladders
and adaptive values computed too: the caches emptied first). Building the ``Demand`` values is
the agents' cost, not the allocator's.

    nice python3 bench/allocator_speed.py [--agents 10 100 1000 10000] [--repeats 50]
        [--objective expected_hits | mean_response] [--populations random cell identical]
        [--out bench/results/allocator_speed_expected_hits.jsonl]

One JSON line per measurement (after a provenance line) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ray_scout import provenance
from ray_scout.core.control import allocation
from ray_scout.core.control.allocation import Demand, allocate, demand_for
from ray_scout.core.llm.models import facts_for
from ray_scout.core.modes import Mode
from ray_scout.core.control.policy import (
    PAPER_B_PAYLOAD_BYTES, paper_b_latency, paper_b_profile,
)

PAPER_B_RATIO = {Mode.BF16: 1.0, Mode.INT8: 4.7 / 9.7, Mode.INT4: 2.3 / 9.7,
                 Mode.MIXED_INT4: 2.6 / 9.7}
PAPER_B_QUALITY = {Mode.BF16: 1.0, Mode.INT8: 0.996, Mode.INT4: 0.962, Mode.MIXED_INT4: 1.07,
                   Mode.SCOUT: 0.95}


def bf16_bytes_per_token() -> list[int]:
    return [facts_for(f"qwen2.5-{s}").bf16_bytes_per_token() for s in ("3b", "7b", "14b")]


def random_demands(n: int, seed: int, per_token: list[int]) -> list[Demand]:
    rng = np.random.default_rng(seed)
    demands = []
    for i in range(n):
        tokens = int(rng.integers(256, 4097))
        bf16 = per_token[int(rng.integers(3))] * tokens
        sizes = {m: int(bf16 * r) for m, r in PAPER_B_RATIO.items()}
        sizes[Mode.SCOUT] = 2 * tokens // 4
        quality = {m: float(q * rng.uniform(0.85, 1.15)) for m, q in PAPER_B_QUALITY.items()}
        fixed = {m: float(rng.uniform(0.05, 0.6)) for m in sizes}
        demands.append(Demand(f"agent-{i}", sizes, quality, float(rng.uniform(0.5, 3.0)),
                              fixed, weight=float(rng.uniform(0.5, 2.0)),
                              arrival_rate_hz=float(rng.uniform(0.05, 0.5)),
                              safety_margin=0.1))
    return demands


def cell_demands(n: int, per_token: list[int]) -> list[Demand]:
    """``cell_1000.yaml``'s demand shapes (module docstring), in its proportions."""
    profile, latency = paper_b_profile("3b-7b"), paper_b_latency()
    out = []
    for i in range(n):
        model = 0 if i % 20 < 8 else 1 if i % 20 < 15 else 2
        bf16 = per_token[model] * 1024
        sizes = {m: int(bf16 * r) for m, r in PAPER_B_RATIO.items()}
        sizes[Mode.SCOUT] = 2 * 1024 // 4
        out.append(demand_for(f"cell-{i}", sizes, profile, latency, deadline_s=3.0,
                              arrival_rate_hz=0.1, safety_margin=0.1,
                              guards_next_arrival=i % 4 == 0))
    return out


def population(name: str, n: int, per_token: list[int]) -> list[Demand]:
    if name == "random":
        return random_demands(n, seed=0, per_token=per_token)
    if name == "cell":
        return cell_demands(n, per_token)
    return [demand_for(f"same-{i}", PAPER_B_PAYLOAD_BYTES, paper_b_profile("3b-7b"),
                       paper_b_latency(), deadline_s=1.5, arrival_rate_hz=0.25,
                       safety_margin=0.1) for i in range(n)]


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.thread_time() - c0) * 1e3, (time.perf_counter() - t0) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=50,
                        help="re-splits timed per cell (10,000 agents: a tenth, at least 3)")
    parser.add_argument("--objective", default="expected_hits",
                        choices=("expected_hits", "mean_response"))
    parser.add_argument("--populations", nargs="+", default=["random", "cell", "identical"],
                        choices=("random", "cell", "identical"))
    parser.add_argument("--strategies", nargs="+",
                        default=["equal", "model_aware", "greedy", "quality_max", "optimal"])
    parser.add_argument("--out", type=Path, help="JSON lines, one per measurement")
    args = parser.parse_args()
    per_token = bf16_bytes_per_token()
    sink = args.out.open("w") if args.out else None

    def emit(row: dict) -> None:
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    where = provenance.record()  # at the start: the load before the runs
    emit({"kind": "provenance", **where, "argv": sys.argv, "numpy": np.__version__})
    print(f"# allocator speed, objective {args.objective}: {where['machine']}, commit "
          f"{where['commit']}, load average {where['load_average_1_5_15'][0]:.1f} at start")
    print("| population | agents | strategy | capacity (Mbit/s per agent) | first split, new "
          "shapes CPU (ms) | first split, known shapes CPU (ms) | re-split CPU median (ms) "
          "| re-split CPU p99 (ms) | re-split wall median (ms) | objective |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.populations:
        for n in args.agents:
            repeats = args.repeats if n < 10_000 else max(3, args.repeats // 10)
            for strategy in args.strategies:
                demands = population(name, n, per_token)
                allocation._LADDERS.clear()
                allocation._ADAPTIVE.clear()
                allocation._PROBLEMS.clear()
                new_cpu, _ = timed(lambda: allocate(strategy, demands, n * 1e6,
                                                    args.objective))
                demands = population(name, n, per_token)  # new objects, same shapes
                known_cpu, _ = timed(lambda: allocate(strategy, demands, n * 1e6,
                                                      args.objective))
                for per_agent_mbit in (0.1, 1, 10):
                    capacity = n * per_agent_mbit * 1e6
                    alloc = allocate(strategy, demands, capacity, args.objective)
                    runs = [timed(lambda: allocate(strategy, demands, capacity,
                                                   args.objective)) for _ in range(repeats)]
                    cpus, walls = [c for c, _ in runs], [w for _, w in runs]
                    row = {"kind": "split", "objective": args.objective, "population": name,
                           "agents": n, "strategy": strategy,
                           "capacity_per_agent_mbit": per_agent_mbit,
                           "first_new_shapes_cpu_ms": new_cpu,
                           "first_known_shapes_cpu_ms": known_cpu,
                           "resplit_cpu_median_ms": statistics.median(cpus),
                           "resplit_cpu_p99_ms": float(np.percentile(cpus, 99)),
                           "resplit_wall_median_ms": statistics.median(walls),
                           "repeats": repeats, "objective_value": alloc.objective,
                           "load": os.getloadavg()[0]}
                    emit(row)
                    print(f"| {name} | {n} | {strategy} | {per_agent_mbit:g} | {new_cpu:.1f} | "
                          f"{known_cpu:.1f} | {row['resplit_cpu_median_ms']:.2f} | "
                          f"{row['resplit_cpu_p99_ms']:.2f} | "
                          f"{row['resplit_wall_median_ms']:.2f} | {alloc.objective:.1f} |",
                          flush=True)
    emit({"kind": "end", "load_end": os.getloadavg()})
    print(f"# load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
