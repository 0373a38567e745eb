"""The best quality any policy can have at ``model_aware``'s rates with >= 98% hits.

``allocation_congestion`` (Paper B's example: two Qwen2.5-7B and two 14B agents, 50 Mbit/s,
2.5 s deadline, Poisson arrivals at 0.25 Hz) under ``model_aware``: each agent's rate is
fixed, its share of the capacity in proportion to its KV size, so the agents do not
interact (each has its own link, the cloud has a slot per agent) and an agent's requests
are a single FIFO server, as the EdgeAgent and the simulator serve them: a request sent in
mode m holds the agent ``D_m = fixed_m + 8 bytes_m / (rate x 1448/1514)`` (every latency
term of the spec's stage times, then the wire at the rate the lab's links deliver) from
when it starts, ``max(arrival, the previous one's end)``. An **oracle** that knows every
arrival of the schedule in advance picks, per request, a mode that ends by its deadline
(quality of the mode) or to skip it (a miss, quality 0, the agent stays free: sending
something that will miss is never better). No policy, online or not, does better on that
schedule under that service model, which is the simulator's (its figures lie inside the
emulated intervals, docs/TESTBED.md).

That oracle sees the future. A policy that does not (every policy of this testbed decides
on what has happened) is bounded much lower, by Poisson arrivals: a KV service of D_m
started at s leaves a request arriving in [s, s + w_m), ``w_m = D_m + D_fastest - T``, less
than the fastest mode's time when the agent is free, so it misses whatever is done; those
windows are fixed when the send is decided, so the expected number of arrivals in them is
``lambda x w_m`` per KV send (the Poisson compensator), and no arrival lies in two. With
hits H_m per KV mode, H_s on the fastest (scout), misses M among N requests:
``E[M] >= sum_m lambda w_m E[H_m]`` and quality ``Q = q_s (N - M) + sum_m (q_m - q_s) H_m``,
so at a miss rate m = E[M]/N

    E[Q]/N <= q_s + m (r - q_s),   r = max over agents and KV modes of (q_m - q_s) / (lambda w_m)

(the gain per expected doomed arrival of the best KV mode). Computed from the spec's service
model and, as a check, from the emulated run's measured services (``--measured``: the
median of latency less agent queue per agent and mode under ``model_aware``).

Exact: per agent a dynamic programme over its requests keeps, for each number of misses,
the Pareto front of (time the agent is free, quality so far); then the agents' miss
budgets are combined so that all misses together stay within 2% of the requests (>= 98%
hits), maximizing total quality. The bound per schedule is that total over the requests.
Schedules: the spec's seed (the emulated run's 50 requests) and ``--replications`` seeds
as ``allocation_congestion_replicated.yaml`` draws them.

    python3 bench/model_aware_bound.py [--replications 20]
        [--measured experiments/results/allocation_congestion/requests.csv]
        [--out bench/results/model_aware_bound]

Writes ``<out>.csv`` (one row per schedule: requests, the oracle's bound, the same with no
miss allowed), ``<out>.json`` (provenance, the rates, service times, both bounds) and
``<out>.png`` (the online bound against the hit rate, the emulated runs' points and the
goal). Deterministic, no timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_scout import provenance  # noqa: E402
from ray_scout.core.control.allocation import allocate, demand_for  # noqa: E402
from ray_scout.core.evaluation.metrics import bootstrap_ci  # noqa: E402
from ray_scout.core.modes import CLOUD_MODES, Mode  # noqa: E402
from ray_scout.experiments.plan import replication_seed  # noqa: E402
from ray_scout.experiments.runner import simulated_agents  # noqa: E402
from ray_scout.experiments.spec import capacity_trace, load_spec  # noqa: E402
from ray_scout.net.profiles import TCP_PAYLOAD_PER_FRAME  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "allocation_congestion.yaml"
HIT_GOAL = 0.98


def services(agent, rate_bps: float, tokens: int) -> dict[Mode, tuple[float, float]]:
    """(service s, quality) of every mode the agent can send at ``rate_bps``."""
    sizes = agent.payload_bytes(tokens)
    out = {}
    for mode in CLOUD_MODES:
        q = agent.quality.quality(mode)
        if mode not in sizes or q is None or mode not in agent.latency.cloud_s:
            continue
        wire = sizes[mode] * 8 / (rate_bps * TCP_PAYLOAD_PER_FRAME) if rate_bps > 0 else math.inf
        out[mode] = (agent.latency.fixed_s(mode) + wire, q)
    return out


def best_by_misses(arrivals, deadline_s: float, options, max_misses: int) -> list[float]:
    """The oracle's best total quality over one agent's requests, per number of misses
    (0..max_misses; -inf where impossible)."""
    # states[m]: Pareto front of (free at, quality) with m misses so far.
    states = [[(0.0, 0.0)]] + [[] for _ in range(max_misses)]
    for t in arrivals:
        nxt = [[] for _ in range(max_misses + 1)]
        for m, front in enumerate(states):
            for free_at, quality in front:
                if m < max_misses:
                    nxt[m + 1].append((free_at, quality))  # skip it: a miss
                start = max(free_at, t)
                for service, q in options:
                    if start + service <= t + deadline_s + 1e-9:
                        nxt[m].append((start + service, quality + q))
        states = [_pareto(front) for front in nxt]
    return [max((q for _, q in front), default=-math.inf) for front in states]


def _pareto(front):
    """Keep the states no other is both free earlier (or as early) and better for."""
    out, best = [], -math.inf
    for free_at, quality in sorted(front, key=lambda s: (s[0], -s[1])):
        if quality > best + 1e-12:
            out.append((free_at, quality))
            best = quality
    return out


def bound(spec) -> dict:
    agents = simulated_agents(spec)
    capacity = capacity_trace(spec).rate_at(0.0)
    demands = [demand_for(a.agent_id, a.payload_bytes(a.context_tokens[0]), a.quality,
                          a.latency, a.deadline_s) for a in agents]
    rates = allocate("model_aware", demands, capacity).rate_bps
    n = sum(len(a.schedule) for a in agents)
    budget = math.floor((1 - HIT_GOAL) * n + 1e-9)
    per_agent, detail = [], {}
    for a in agents:
        opts = services(a, rates[a.agent_id], a.context_tokens[0])
        detail[a.agent_id] = {"rate_bps": rates[a.agent_id],
                              "service_s": {m.value: s for m, (s, _) in opts.items()},
                              "quality": {m.value: q for m, (_, q) in opts.items()}}
        per_agent.append(best_by_misses([t for t, _ in a.schedule], a.deadline_s,
                                        list(opts.values()), budget))
    # Spread the miss budget over the agents (a small knapsack: budgets are a few misses).
    best = {0: 0.0}
    for row in per_agent:
        best = {used + m: max(best.get(used + m, -math.inf), value + row[m])
                for used, value in best.items() for m in range(len(row))
                if used + m <= budget and row[m] > -math.inf}
    scout = [agents[0].quality.quality(Mode.SCOUT)] * n
    return {"requests": n, "miss_budget": budget, "bound": max(best.values()) / n,
            "bound_no_miss": sum(r[0] for r in per_agent) / n,
            "always_scout": float(np.mean(scout)), "agents": detail}


def online_bound(agents: dict, arrival_rate_hz: dict, deadline_s: float) -> dict:
    """``r`` and the bound's terms (module docstring) from per-agent service times."""
    best = None
    for name, a in agents.items():
        service, quality = a["service_s"], a["quality"]
        fastest = min(service, key=service.get)
        for mode, d in service.items():
            window = d + service[fastest] - deadline_s
            gain = quality[mode] - quality[fastest]
            if mode == fastest or gain <= 0:
                continue
            if window <= 0:  # a KV mode no arrival pays for: no bound of this kind
                return {"ratio": math.inf, "agent": name, "mode": mode, "window_s": window}
            ratio = gain / (arrival_rate_hz[name] * window)
            if best is None or ratio > best["ratio"]:
                best = {"ratio": ratio, "agent": name, "mode": mode, "window_s": window,
                        "gain": gain, "fastest": fastest, "q_fastest": quality[fastest]}
    best["q_best"] = max(q for a in agents.values() for q in a["quality"].values())
    return best


def bound_at(online: dict, miss_rate: float) -> float:
    """The online bound at ``miss_rate``, never above the best mode's quality."""
    return min(online["q_fastest"] + miss_rate * (online["ratio"] - online["q_fastest"]),
               online["q_best"])


def measured_services(path: Path, model: dict) -> dict:
    """The model's agents with the emulated run's median service per mode (model_aware)."""
    rows = pd.read_csv(path)
    rows = rows[(rows.allocator == "model_aware") & rows.deadline_met]
    service = (rows.latency_s - rows.agent_queue_s).groupby([rows.agent, rows["mode"]]).median()
    out = {}
    for name, a in model.items():
        seen = {m: float(service[(name, m)]) for m in a["service_s"] if (name, m) in service}
        out[name] = {"service_s": seen, "quality": {m: a["quality"][m] for m in seen},
                     "rate_bps": a["rate_bps"]}
    return out


def plot(online: dict, measured: dict | None, points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    miss = np.linspace(0, 0.16, 50)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(100 * (1 - miss), [bound_at(online, m) for m in miss], label="online bound (model)")
    if measured:
        ax.plot(100 * (1 - miss), [bound_at(measured, m) for m in miss], "--",
                label="online bound (measured services)")
    for label, (hits, quality) in points.items():
        ax.plot(100 * hits, quality, "o")
        ax.annotate(label, (100 * hits, quality), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(0.956, color="grey", linestyle=":", label="goal 0.956")
    ax.axvline(98, color="grey", linestyle="-.", label="98% hits")
    ax.set_xlabel("deadline hits (%)")
    ax.set_ylabel("mean quality (misses count 0)")
    ax.set_title("allocation_congestion at model_aware's rates")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replications", type=int, default=20)
    parser.add_argument("--measured", type=Path, default=Path(
        "experiments/results/allocation_congestion/requests.csv"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_aware_bound"))
    args = parser.parse_args()
    base = load_spec(SPEC, fidelity="simulated")
    rows, detail = [], None
    seeds = [("emulated run's schedule", base.seed)] + [
        (f"replication {r}", replication_seed(base.seed, r)) for r in range(args.replications)]
    for label, seed in seeds:
        result = bound(dataclasses.replace(base, seed=seed))
        detail = detail or result["agents"]
        rows.append({"schedule": label, "seed": seed,
                     **{k: v for k, v in result.items() if k != "agents"}})
        print(f"{label} (seed {seed}): {result['requests']} requests, bound "
              f"{result['bound']:.3f} ({result['miss_budget']} misses allowed), with no miss "
              f"{result['bound_no_miss']:.3f}", flush=True)
    table = pd.DataFrame(rows)
    reps = table[table.schedule != "emulated run's schedule"]
    pooled = reps.bound.mul(reps.requests).sum() / reps.requests.sum()
    summary = {"emulated_schedule_bound": float(table.bound.iloc[0]),
               "replications": len(reps),
               "replication_bound_mean_ci": list(bootstrap_ci(reps.bound.to_numpy())),
               "replication_bound_max": float(reps.bound.max()),
               "pooled_bound": float(pooled)}
    rates = {g: base.groups_by_agent()[g].arrival_rate_hz for g in detail}
    deadline = next(iter(base.groups_by_agent().values())).deadline_s
    online = online_bound(detail, rates, deadline)
    seen = (measured_services(args.measured, detail) if args.measured.exists() else None)
    online_seen = online_bound(seen, rates, deadline) if seen else None
    summary["online_model"] = {**online, "bound_at_goal": bound_at(online, 1 - HIT_GOAL)}
    if online_seen:
        summary["online_measured"] = {**online_seen,
                                      "bound_at_goal": bound_at(online_seen, 1 - HIT_GOAL)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"provenance": provenance.record(), "argv": sys.argv, "spec": str(SPEC.name),
         "hit_goal": HIT_GOAL, "agents": detail, "measured_agents": seen,
         "summary": summary}, indent=2))
    points = {"oracle (knows the arrivals)": (1.0, summary["emulated_schedule_bound"])}
    if args.measured.exists():
        rows = pd.read_csv(args.measured)
        for policy, group in rows[rows.allocator == "model_aware"].groupby("policy"):
            points[f"{policy}, emulated"] = (group.deadline_met.mean(), group.quality.mean())
    plot(online, online_seen, points, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
