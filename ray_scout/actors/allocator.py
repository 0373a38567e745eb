"""Allocator: the epoch loop that splits the bottleneck among the agents.

What lives here: the clock of a run's capacity (ticks every ``epoch_s`` and at every change
time of the trace), gathering the agents' demands, ``core.control.allocation.allocate``, applying the
result through the link managers (one call each, all at once: one per lab node, or the
lab-in-a-box's one), telling every agent its grant, and one
``epochs`` row per agent each time the split is applied (capacity, rate, planned mode,
decision and netlink call times). Demands are
each agent's typical request (median context), gathered once: they do not change during a
run, so only capacity changes move the split; the links and agents are touched only when the
split changes. What it leaves to others: the strategies (core), shaping (the link managers).
"""

from __future__ import annotations

import time
from typing import Any

from ray_scout.core.control.allocation import allocate
from ray_scout.core.control.capacity import CapacityTrace


def tick_times(trace: CapacityTrace, epoch_s: float, duration_s: float) -> list[float]:
    """Epoch ticks (k x epoch_s, no float drift) merged with the trace's change times."""
    ticks = {round(k * epoch_s, 9) for k in range(int(duration_s / epoch_s) + 1)}
    ticks |= {t for t in trace.change_times_s if t < duration_s}
    return sorted(ticks)


class Allocator:
    """``run(t0)`` drives capacity and allocation until ``duration_s``; rows go to the recorder."""

    def __init__(self, strategy: str, trace: CapacityTrace, epoch_s: float, duration_s: float,
                 agents: dict[str, Any], link_managers: list[Any], recorder: Any):
        from ray.util import metrics

        if epoch_s <= 0:
            raise ValueError(f"epoch_s must be positive, not {epoch_s}")
        self.strategy = strategy
        self.trace = trace
        self.epoch_s = epoch_s
        self.duration_s = duration_s
        self.agents = agents
        self.link_managers = link_managers
        self.recorder = recorder
        self.capacity_bps: float | None = None
        self.last_split_t_s: float | None = None
        self.capacity_gauge = metrics.Gauge("ray_scout_allocator_capacity_bps",
                                            "bottleneck capacity in force, bit/s",
                                            tag_keys=("strategy",))
        self.objective_gauge = metrics.Gauge("ray_scout_allocator_objective",
                                             "sum of planned expected quality",
                                             tag_keys=("strategy",))

    def __repr__(self) -> str:
        """The allocator in a few words (Ray's Actors table shows it as the actor starts;
        the actor's log has a line per applied split)."""
        if self.last_split_t_s is None:
            return f"Allocator {self.strategy}: no split yet"
        return (f"Allocator {self.strategy}: {self.capacity_bps / 1e6:.1f} Mbit/s split at "
                f"t={self.last_split_t_s:.1f} s")

    def run(self, t0_unix_s: float) -> int:
        import ray

        demands = ray.get([a.demand.remote() for a in self.agents.values()])
        last: dict[str, float] | None = None
        last_capacity = None
        epochs = 0
        for t in tick_times(self.trace, self.epoch_s, self.duration_s):
            wait = t0_unix_s + t - time.time()
            if wait > 0:
                time.sleep(wait)
            capacity = self.trace.rate_at(t)
            changed = capacity != last_capacity
            decide_start = time.perf_counter()
            alloc = allocate(self.strategy, demands, capacity) if changed or last is None else None
            decide_s = time.perf_counter() - decide_start
            apply_s = 0.0
            if alloc is not None and (dict(alloc.rate_bps) != last or changed):
                # The managers run in parallel: the split is in force after the slowest one.
                apply_s = max(ray.get([m.apply.remote(capacity, dict(alloc.rate_bps))
                                       for m in self.link_managers]))
                for name, agent in self.agents.items():
                    agent.set_grant.remote(alloc.rate_bps[name])
                last, last_capacity = dict(alloc.rate_bps), capacity
                self.capacity_bps, self.last_split_t_s = capacity, t
                print(repr(self), flush=True)
                self.capacity_gauge.set(capacity, tags={"strategy": self.strategy})
                self.objective_gauge.set(alloc.objective, tags={"strategy": self.strategy})
                rows = [dict(t_s=t, wall_time_s=time.time(), agent=name, capacity_bps=capacity,
                             strategy=alloc.strategy, rate_bps=alloc.rate_bps[name],
                             planned_mode=alloc.mode[name].value, objective=alloc.objective,
                             decide_s=decide_s, apply_s=apply_s)
                        for name in self.agents]
                self.recorder.add_many.remote("epochs", rows)
            epochs += 1
        return epochs
