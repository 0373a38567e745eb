"""How long each allocator takes to decide for many agents (goal: 1,000 x 6 modes in 10 ms).

Agents are drawn at random: an edge model among the Qwen2.5 presets (its BF16 KV bytes per
token from the model config), a context of 256-4096 tokens, payloads per mode scaled from
BF16 by Paper B's modes table (INT8 4.7/9.7, INT4 2.3/9.7, mixed INT4 2.6/9.7, scout 2 B
per selected index at 25% retention), quality per mode jittered around Paper B's, a
deadline of 0.5-3 s, 0.05-0.6 s of fixed latency per mode, Poisson arrivals at 0.05-0.5 Hz
and the adaptive policy's 10% margin (queue-aware demands, docs/POLICY.md). Six options per
agent: the five cloud modes and the rate-0 local fallback.

A second population is the worst case for ``optimal``: 1,000 identical agents with Paper B's
payloads, profile (3b-7b) and stage times, at 0.25 Hz with the 10% margin. Symmetry defeats
its bound-based reduction (any agent may take the upgrade), so its DP runs over every agent.

Timed: ``allocate(strategy, demands, capacity)`` end to end (building the matrices
included), after one warm-up, at several bottleneck capacities. Building the 1,000
``Demand`` values (each gathers its per-mode vector once) is timed apart: agents pay it when
they report, not the allocator. The load average is printed because the dev box is shared:
wall-clock median and p99 move with it; the CPU time of the calling thread
(``time.thread_time``) counts only the work, so its median is the cost on an idle core.

    nice python3 bench/allocator_speed.py [--agents 1000] [--repeats 50]
        [--objective expected_hits | mean_response]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from ray_scout.core.control.allocation import Demand, _fill_ladders, allocate, demand_for
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--objective", default="expected_hits",
                        choices=("expected_hits", "mean_response"))
    args = parser.parse_args()
    per_token = bf16_bytes_per_token()
    t0 = time.perf_counter()
    demands = random_demands(args.agents, seed=0, per_token=per_token)
    build_ms = (time.perf_counter() - t0) * 1e3
    print(f"# allocator speed: {args.agents} agents x 6 options, {args.repeats} repeats, "
          f"{platform.machine()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"# building {args.agents} demands (sampling included): {build_ms:.1f} ms")
    if args.objective == "expected_hits":
        # The hit ladders (M/D/1 inversions) are the agents' once-per-demand cost, cached on
        # each Demand: timed here, apart from the allocations.
        t0 = time.perf_counter()
        _fill_ladders(demands)
        print(f"# objective expected_hits; hit ladders of {args.agents} demands: "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")
    print("| strategy | agents | capacity (Mbit/s) | wall min (ms) | wall median (ms) | wall p99 (ms) "
          "| CPU median (ms) | CPU p99 (ms) | objective |")
    print("|---|---|---|---|---|---|---|---|---|")
    identical = [demand_for(f"same-{i}", PAPER_B_PAYLOAD_BYTES, paper_b_profile("3b-7b"),
                            paper_b_latency(), deadline_s=1.5, arrival_rate_hz=0.25,
                            safety_margin=0.1) for i in range(args.agents)]
    cases = [(s, "random", demands) for s in ("equal", "model_aware", "greedy", "quality_max",
                                               "optimal")]
    cases += [(s, "identical", identical) for s in ("quality_max", "optimal")]
    for strategy, population, agents in cases:
        for capacity_mbit in (100, 1_000, 10_000):
            allocate(strategy, agents, capacity_mbit * 1e6, args.objective)
            times, cpu = [], []
            for _ in range(args.repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                alloc = allocate(strategy, agents, capacity_mbit * 1e6, args.objective)
                cpu.append((time.thread_time() - c0) * 1e3)
                times.append((time.perf_counter() - t0) * 1e3)
            print(f"| {strategy} | {population} | {capacity_mbit} | {min(times):.2f} | "
                  f"{statistics.median(times):.2f} | {np.percentile(times, 99):.2f} | "
                  f"{statistics.median(cpu):.2f} | {np.percentile(cpu, 99):.2f} | "
                  f"{alloc.objective:.1f} |")
    print(f"# load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
